"""A lone session's steps run on the asyncio loop's thread (no hand-off to the worker and back);
as soon as a second session steps, every step goes through the worker thread again, batched."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from specsplit.serving.batcher import StepBatcher


def _run(n_sessions: int, steps: int, fail_on: int | None = None) -> tuple[list[tuple[str, int]], StepBatcher]:
    where: list[tuple[str, int]] = []  # (thread, batch size) of every step

    def step(items: list[int]) -> list[int]:
        if fail_on is not None and fail_on in items:
            raise ValueError(f"bad item {fail_on}")
        where.append((threading.current_thread().name, len(items)))
        time.sleep(0.005)  # a forward pass: the batcher learns its time and waits for returning sessions
        return [x * 10 for x in items]

    batcher: StepBatcher[int, int] = StepBatcher(step, name="t", gather=0.5, inline_alone=True)

    async def session(i: int, start_after: float) -> None:
        await asyncio.sleep(start_after)
        for j in range(steps):
            item = 100 * i + j
            got, _ = await batcher.submit(item, key=i)
            assert got == item * 10
            await asyncio.sleep(0)  # back at once: two sessions share the worker's steps
        where.append(("release", i))
        batcher.release(i)

    async def main() -> None:
        batcher.start()
        try:
            await asyncio.gather(*(session(i, 0.03 * i) for i in range(n_sessions)))
        finally:
            await batcher.stop()

    asyncio.run(main())
    return where, batcher


def test_a_lone_session_steps_on_the_loop_thread() -> None:
    where, batcher = _run(1, 5)
    assert [w[0] for w in where if w[0] != "release"] == [threading.main_thread().name] * 5
    assert batcher.inline_steps == batcher.steps == 5


def test_a_second_session_sends_every_step_to_the_worker() -> None:
    where, batcher = _run(2, 40)
    steps = [w for w in where if w[0] != "release"]
    on_worker = [w for w in steps if w[0].startswith("specsplit-t")]
    assert batcher.inline_steps >= 1  # the first session, alone for its first 30 ms
    assert any(size == 2 for _, size in on_worker)  # together: batched on the worker
    # from the second session's first step until a session ends, every step is on the worker
    first = where.index(on_worker[0])
    first_release = where.index(next(w for w in where if w[0] == "release"))
    assert all(w[0].startswith("specsplit-t") for w in where[first:first_release])
    assert batcher.steps == batcher.inline_steps + len(on_worker)


def test_an_inline_step_that_fails_raises_to_its_session() -> None:
    with pytest.raises(ValueError, match="bad item 2"):
        _run(1, 5, fail_on=2)
