"""KV memory pressure on a tier: refuse sessions that cannot fit, preempt the newest.

The gateway owns every sequence's tokens, so a tier's KV cache is soft state. When a
batched step does not fit the pool, the tier fails the *newest* sessions of the batch with
RESOURCE_EXHAUSTED (their streams end, which frees their blocks) and steps the rest; the
gateway re-opens the preempted sessions after a backoff, re-sending prompt + committed
tokens, so nothing is lost and the older sessions keep making progress (as vLLM's LIFO
recompute preemption). A new session is refused at once when the pool has no room for its
prompt, instead of taking blocks that running sessions need for their next round.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from specsplit.runtime.kv_cache import OutOfKVMemory, PagedKVCache

Item = TypeVar("Item")


class Preempted(OutOfKVMemory):
    """This session was dropped to let older ones step; re-open it later (RESOURCE_EXHAUSTED)."""


def admit(cache: PagedKVCache | None, num_tokens: int) -> None:
    """Refuse a new session whose prompt (plus one block to grow into) does not fit now."""
    if cache is None:
        return
    need = min(-(-num_tokens // cache.block_size) + 1, cache.num_blocks)
    if need > cache.num_free_blocks:
        raise OutOfKVMemory(f"KV cache full: a new session of {num_tokens} tokens needs {need} blocks, "
                            f"{cache.num_free_blocks} of {cache.num_blocks} free; retry later")


def preempting(step: Callable[[list[Item]], list[Any]], seq_id: Callable[[Item], int]
               ) -> Callable[[list[Item]], list[Any]]:
    """Wrap a batched step: on OutOfKVMemory, drop the newest session and try the rest again.

    The dropped items get a `Preempted` result (the batcher delivers it as their error). A
    failed step changes no KV state (the runner checks room before reserving), so retrying
    with fewer sessions is safe; a drafter that ran some of its k forwards before running
    out rolls back to the request's prefix when it is asked again.
    """

    def run(items: list[Item]) -> list[Any]:
        live = sorted(range(len(items)), key=lambda i: seq_id(items[i]))  # oldest first
        out: list[Any] = [None] * len(items)
        while live:
            try:
                results = step([items[i] for i in live])
            except OutOfKVMemory as e:
                victim = live.pop()
                out[victim] = Preempted(f"preempted: {e}; the session must be re-opened")
                continue
            for i, r in zip(live, results, strict=True):
                out[i] = r
            break
        return out

    return run
