"""The direct round: the target tier runs a completion's rounds itself.

The gateway opens one `Generate` stream per completion and names a draft replica; the tier
asks that replica for blocks over a stream of its own, verifies them in its batched step
(`LocalTarget`), and sends each round's committed tokens straight back. Per round, only the
draft's block crosses the network on the critical path (none when it was drafted ahead), and
the gateway's streaming to the client runs beside the next round instead of between rounds.
The round itself is `CompletionLoop`, the same one the gateway runs in gateway-driven mode.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from specsplit import trace
from specsplit.proto.v1 import draft_pb2_grpc, target_pb2
from specsplit.sampling.params import SamplingParams
from specsplit.serving.batcher import StepBatcher
from specsplit.serving.completion_loop import CompletionLoop, Delta, LoopOptions
from specsplit.serving.convert import logprobs_to_pb
from specsplit.serving.replicas import ReplicaPool
from specsplit.serving.target_link import Q, TargetLink, Verdict
from specsplit.serving.tls import ClientTLS
from specsplit.speculation.adaptive import CostModel
from specsplit.speculation.branches import MAX_BRANCHES
from specsplit.speculation.sequence import Sequence
from specsplit.speculation.session import MAX_BLOCK, SessionError
from specsplit.speculation.target import TargetVerifier, VerifyItem, VerifyResult

log = logging.getLogger(__name__)


class LocalTarget(TargetLink):
    """The completion's session in this tier's own verifier, stepped through the batcher."""

    def __init__(self, verifier: TargetVerifier, batcher: StepBatcher[VerifyItem, VerifyResult], seq_id: int,
                 seq: Sequence, open_fn: Any, close_fn: Any) -> None:
        self.verifier, self.batcher, self.seq_id, self.seq = verifier, batcher, seq_id, seq
        self._open_fn, self._close_fn = open_fn, close_fn
        self.opened = False
        self.prompt_len: int | None = None  # leading tokens that are the prompt (None: all)
        self.on_progress: Callable[[int, int], None] | None = None  # (prefilled, total) of a long prefill
        self.hidden_layers: tuple[int, ...] = ()  # EAGLE draft: the target states each verify returns
        self._fresh = False  # the next verify is the session's first

    async def open(self) -> None:
        await self.batcher.call(functools.partial(self._open_fn, hidden_layers=self.hidden_layers), self.seq_id,
                                self.seq.all_ids, self.seq.params, self.prompt_len)
        self.opened = self._fresh = True

    async def verify(self, block: list[int], q: Q) -> Verdict:
        item = VerifyItem(self.seq_id, list(block), *q, stop_states=self._take_stop_states())
        trace.mark("verify.submit", self.seq_id)
        res, queue_ns = await self.batcher.submit(item, self.seq_id)
        trace.mark("verify.resumed", self.seq_id)
        chunked = res.pending
        while res.prefill is not None:  # a chunk of a long prompt went in: report it, step again
            if self.on_progress is not None:
                self.on_progress(*res.prefill)
            res, queue_ns = await self.batcher.submit(item, self.seq_id)
        fresh, self._fresh = self._fresh, False
        return Verdict(res.num_accepted, res.emitted, res.logprobs, res.verify_ns, queue_ns, res.prompt_logprobs,
                       res.packed_states, fresh, chunked)

    async def close(self) -> None:
        self.batcher.release(self.seq_id)
        if self.opened:
            self.opened = False
            await self.batcher.call(self._close_fn, self.seq_id)


class DraftPools:
    """One channel per draft replica this tier was asked to draft with, shared by sessions."""

    def __init__(self, tls: ClientTLS | None) -> None:
        self.tls = tls
        self._pools: dict[str, ReplicaPool] = {}

    def get(self, address: str) -> ReplicaPool:
        pool = self._pools.get(address)
        if pool is None:
            pool = self._pools[address] = ReplicaPool("draft", draft_pb2_grpc.DraftServiceStub, tls=self.tls)
            pool.set_addresses([address])
        return pool

    async def close(self) -> None:
        for p in self._pools.values():
            await p.close()


def start_to_sequence(start: target_pb2.GenerateStart, params: SamplingParams, max_model_len: int) -> Sequence:
    """The tier's view of the completion: ends on the given end tokens or after max_new_tokens;
    stop strings are the caller's (it closes the stream when it sees one)."""
    ids = list(start.token_ids)
    if not ids:
        raise SessionError("the prompt is empty")
    if start.num_speculative_tokens > MAX_BLOCK:
        raise SessionError(f"num_speculative_tokens={start.num_speculative_tokens} exceeds {MAX_BLOCK}")
    if start.max_branches > MAX_BRANCHES:
        raise SessionError(f"max_branches={start.max_branches} exceeds {MAX_BRANCHES}")
    if start.stopping.max_new_tokens < 1:
        raise SessionError("stopping.max_new_tokens must be >= 1")
    # every token-choice field as given; stopping by id only (EOS is among end_token_ids unless ignored)
    tier_params = dataclasses.replace(params, max_tokens=int(start.stopping.max_new_tokens),
                                      stop_token_ids=list(start.stopping.end_token_ids), ignore_eos=True)
    return Sequence(0, ids, tier_params, (), max_model_len)


def delta_to_pb(d: Delta) -> target_pb2.GenerateServerMessage:
    t = d.timing
    timing = target_pb2.RoundTiming(
        round_ns=t.round_ns, verify_ns=t.verify_ns, verify_queue_ns=t.verify_queue_ns,
        draft_wait_ns=t.draft_wait_ns, draft_ns=t.draft_ns, draft_queue_ns=t.draft_queue_ns,
        verify_wait_ns=t.verify_wait_ns, draft_handled_ns=t.draft_handled_ns, ahead_wait_ns=t.ahead_wait_ns,
    ) if t is not None else None
    return target_pb2.GenerateServerMessage(delta=target_pb2.GenerateDelta(
        token_ids=d.token_ids, logprobs=logprobs_to_pb(d.logprobs, d.token_ids), drafted=d.drafted,
        accepted=d.accepted, pipelined=d.pipelined, timing=timing, draft_failure=d.draft_failure,
        drafted_ahead=d.drafted_ahead,
    ))


async def run_generate(start: target_pb2.GenerateStart, link: LocalTarget,
                       seq: Sequence, drafts: DraftPools, costs: CostModel,
                       round_timeout_s: float) -> AsyncIterator[target_pb2.GenerateServerMessage]:
    """Run the completion's rounds; one message per round."""
    pool = drafts.get(start.draft_address) if start.draft_address else None
    drafting = pool is not None and start.num_speculative_tokens > 0
    layers = link.verifier.check_hidden_layers(tuple(start.hidden_layers)) if drafting else ()
    opts = LoopOptions(num_speculative_tokens=int(start.num_speculative_tokens), adaptive=start.adaptive,
                       pipeline=start.pipeline, max_branches=int(start.max_branches), round_timeout_s=round_timeout_s,
                       vocab_size=link.verifier.vocab_size,
                       hidden_layers=layers, hidden_row_bytes=2 * link.verifier.runner.cfg.hidden_size * len(layers))
    prompt_len = start.prompt_len if start.HasField("prompt_len") else None
    link.prompt_len, link.hidden_layers = prompt_len, layers
    loop = CompletionLoop(seq, link, pool if drafting else None, costs, opts, prompt_len)
    # rounds and prefill progress reports share the stream: the loop runs beside the writer
    out: asyncio.Queue[target_pb2.GenerateServerMessage | BaseException | None] = asyncio.Queue()
    link.on_progress = lambda done, total: out.put_nowait(target_pb2.GenerateServerMessage(
        progress=target_pb2.PrefillProgress(prefilled=done, total=total)))

    async def rounds() -> None:
        try:
            async for delta in loop.run():
                msg = delta_to_pb(delta)
                if seq.prompt_logprobs is not None:  # echo: sent once, with the first delta
                    ids = seq.all_ids[1 : len(seq.prompt_logprobs)]
                    msg.delta.prompt_logprobs.extend(logprobs_to_pb(seq.prompt_logprobs[1:], ids))  # type: ignore[arg-type]
                    seq.prompt_logprobs = []  # sent; [] keeps the loop from taking them again
                out.put_nowait(msg)
            out.put_nowait(None)
        except Exception as exc:  # noqa: BLE001 - raised by the writer, as the stream's status
            out.put_nowait(exc)

    task = asyncio.ensure_future(rounds())
    try:
        while (msg := await out.get()) is not None:
            if isinstance(msg, BaseException):
                raise msg
            yield msg
    finally:
        task.cancel()
        await asyncio.shield(loop.close())  # a cancelled caller must still free both tiers' KV
