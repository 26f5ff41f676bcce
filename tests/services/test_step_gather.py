"""The step batcher holds a step briefly for the sessions of the last one, so N sessions that
each spend a moment between steps share one step instead of splitting into halves that take
turns (each at half the batch)."""

from __future__ import annotations

import asyncio
import time

import pytest

from specsplit.serving.batcher import StepBatcher

STEP_S = 0.04


def _step(items: list[int]) -> list[int]:
    time.sleep(STEP_S)  # a forward pass whose time does not grow with the batch (memory bound)
    return items


async def _sessions(batcher: StepBatcher, n: int, steps: int, gap_s: list[float]) -> list[int]:
    sizes: list[int] = []

    async def session(i: int) -> None:
        for _ in range(steps):
            await batcher.submit(i, key=i)
            sizes.append(batcher.last_batch_size)
            await asyncio.sleep(gap_s[i])  # streaming the token, the next round's bookkeeping
        batcher.release(i)

    batcher.start()
    try:
        await asyncio.gather(*(session(i) for i in range(n)))
    finally:
        await batcher.stop()
    return sizes


def _mean_batch(gather: float, gaps: list[float], steps: int = 12) -> tuple[float, StepBatcher]:
    batcher: StepBatcher[int, int] = StepBatcher(_step, name="t", gather=gather)
    sizes = asyncio.run(_sessions(batcher, len(gaps), steps, gaps))
    return sum(sizes) / len(sizes), batcher


def test_sessions_back_soon_share_one_step() -> None:
    gaps = [0.002 * (i + 1) for i in range(6)]  # back 2 to 12 ms after their result
    merged, _ = _mean_batch(0.5, gaps)  # waits up to 20 ms
    split, _ = _mean_batch(0.0, gaps)
    assert merged >= 5.5, merged
    assert split <= 4.5, split  # without gathering, the sessions take turns in smaller steps


def test_a_slow_session_is_not_waited_for() -> None:
    """A session that usually returns after longer than the window (say it drafts between its
    steps) does not hold up the others' steps: after its first gap is known it is not awaited."""
    gaps = [0.0005, 0.004, 0.2]
    _, batcher = _mean_batch(0.25, gaps, steps=6)
    assert batcher.gather_waits >= 4  # the prompt ones are waited for
    # not the whole window (a quarter of a step) per step: once the prompt ones are back and the
    # returns go quiet, or once the slow one's gap is known, the step starts
    window_s = 0.25 * STEP_S
    assert batcher.gather_wait_ns / 1e9 / batcher.steps < window_s / 2, (batcher.gather_wait_ns, batcher.steps)


def test_released_session_is_not_awaited() -> None:
    async def run() -> int:
        batcher: StepBatcher[int, int] = StepBatcher(_step, name="t", gather=10.0)  # window 10 steps
        batcher.start()
        try:
            await batcher.submit(1, key="a")
            await batcher.submit(2, key="b")  # "a" is out: this step may wait for it
            await batcher.submit(3, key="b")
            batcher.release("a")
            batcher.release("b")
            t = time.perf_counter()
            await batcher.submit(4, key="c")  # nobody is awaited: steps at once
            took = time.perf_counter() - t
            assert took < 5 * STEP_S, took
            return batcher.gather_waits
        finally:
            await batcher.stop()

    assert asyncio.run(run()) >= 1



def test_step_gather_flag_reaches_the_tier_config_and_a_bad_share_is_refused() -> None:
    from specsplit.cli import build_parser
    from target_service.config import TargetServiceConfig

    a = build_parser().parse_args(["target", "some-model", "--step-gather", "0.1"])
    assert TargetServiceConfig.from_args(a).step_gather == 0.1
    for bad in ("-0.5", "2"):
        with pytest.raises(ValueError, match="step_gather must be in"):
            TargetServiceConfig.from_args(build_parser().parse_args(["target", "some-model", "--step-gather", bad]))


def test_a_lone_long_step_does_not_stretch_the_wait() -> None:
    """The wait is a share of a usual step: one long step (a prompt's prefill chunk, a CUDA graph
    capture) must not make the next steps wait a share of it for a session that is late."""
    batcher: StepBatcher[int, int] = StepBatcher(_step, name="t", gather=0.25)
    batcher._note_step(900_000_000)  # the first step: a prompt's prefill
    batcher._note_step(40_000_000)
    assert batcher.gather_window_ns == 0.25 * 40_000_000  # the usual step from the first short one on
    for _ in range(5):
        batcher._note_step(40_000_000)  # 40 ms steps
    batcher._note_step(2_000_000_000)  # one 2 s prefill
    assert batcher.gather_window_ns <= 0.25 * 41_000_000
    for _ in range(3):  # a step that long every time is the new usual
        batcher._note_step(2_000_000_000)
    assert batcher.gather_window_ns > 0.25 * 100_000_000


def test_a_session_cancelled_during_its_step_is_not_kept_as_returning() -> None:
    """A client that cancels while its step runs releases its key at once; the step ending
    afterwards must not record it again (it would be awaited once, and kept for good)."""

    async def run() -> StepBatcher:
        batcher: StepBatcher[int, int] = StepBatcher(_step, name="t", gather=0.25)
        batcher.start()
        try:
            task = asyncio.ensure_future(batcher.submit(1, key="gone"))
            await asyncio.sleep(STEP_S / 4)  # the step is running
            task.cancel()
            batcher.release("gone")
            await batcher.submit(2, key="other")  # runs after the cancelled one's step ended
        finally:
            await batcher.stop()
        return batcher

    batcher = asyncio.run(run())
    assert "gone" not in batcher._returners
