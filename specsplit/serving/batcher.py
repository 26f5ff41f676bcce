"""StepBatcher: gathers requests from many sessions and runs them as one batched step.

Every touch of a model (open, step, close) runs on one worker thread, in submission order,
so the engine objects need no locks and the asyncio loop keeps serving streams while a
forward pass runs. Requests that arrive during a step form the next batch.

Sessions that were in the last step and usually come back promptly are waited for, briefly,
before the next step starts (`gather`): a session spends a little time between its steps
(streaming its tokens, the next round's bookkeeping), and a step launched the moment the first
of them returns leaves the rest to wait a whole step. Left alone, N sessions split into two
halves that take turns, each at batch N/2, for half the throughput the device could give.

A lone session's step may run on the asyncio loop's own thread (`inline_alone`): with no other
session to batch with, the hand-off to the worker thread and back only adds two thread wake-ups
to the session's latency (each 0.1-0.2 ms when the threads idled through the other tier's step;
`benchmarks/idle_probe.py`). The draft tier does this; the worker thread is idle while it runs,
so every touch of the model is still one at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from specsplit import trace
from specsplit.speculation.adaptive import Ema

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Res = TypeVar("Res")


@dataclass
class _Pending(Generic[Req]):
    item: Req
    future: asyncio.Future
    enqueued_ns: int
    key: Hashable | None = None


@dataclass
class _Returner:
    """A session between two of its steps: when its last result went out, how long it
    usually takes to submit again (an average of its recent gaps, ns; 0 while unknown)."""

    delivered_ns: int
    gap_ns: float = 0.0

    def back(self, now_ns: int) -> None:
        """Submitted again: learn the gap. A gap far above the usual one (a round that also asked
        the draft tier) moves the average only a little, so one such round does not make a
        prompt session look slow; a session slow every time is learned within a few rounds."""
        gap = now_ns - self.delivered_ns
        if self.gap_ns == 0:
            self.gap_ns = gap
        else:
            self.gap_ns += (0.3 if gap <= 3 * self.gap_ns else 0.1) * (gap - self.gap_ns)
        self.delivered_ns = 0  # back: not awaited until its next result goes out


class StepBatcher(Generic[Req, Res]):
    def __init__(self, step: Callable[[list[Req]], list[Res]], *, max_batch: int = 64, name: str = "step",
                 gather: float = 0.25, inline_alone: bool = False) -> None:
        self._step = step
        self.max_batch = max_batch
        self.name = name
        # wait at most this fraction of a usual step's time for sessions of the last step to come
        # back (only those whose usual gap fits the wait); 0: step at once with whatever is queued
        self.gather = gather
        # a step's usual time: a lone long one (a prompt's prefill chunk, a graph capture) does not
        # stretch the wait that follows it
        self._step_time = Ema(0.0)
        self._returners: dict[Hashable, _Returner] = {}
        self._arrived_ns = 0  # the last submission
        self.gather_waits = 0  # steps that waited for returning sessions
        self.gather_timeouts = 0  # of those, the ones that stepped without a session they waited for
        self.gather_wait_ns = 0  # time spent waiting, in all
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"specsplit-{name}")
        self._pending: list[_Pending[Req]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.steps = 0
        self.last_batch_size = 0
        self.failed: BaseException | None = None  # set when the device broke (INTERNAL)
        self.inline_alone = inline_alone  # a lone session steps on the loop's thread (module docstring)
        self.inline_steps = 0
        self._busy = 0  # jobs on the worker thread (steps, opens, closes), queued or running

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a state change (open/close) on the worker thread, ordered with the steps."""
        return await self._on_worker(fn, *args)

    async def _on_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        self._busy += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            self._busy -= 1

    def _alone(self, key: Hashable | None) -> bool:
        """Nothing else to batch with or to wait for: no queued item, nothing on the worker thread,
        and no other session seen stepping (a second one makes every step go through the worker)."""
        return (self.inline_alone and key is not None and not self._pending and not self._busy
                and self._returners.keys() <= {key})

    def _step_inline(self, item: Req, key: Hashable) -> tuple[Res, int]:
        """A lone session's step, run here on the loop's thread (blocking it: no one else waits)."""
        trace.mark(f"{self.name}.inline", 1)
        start = time.perf_counter_ns()
        (result,) = self._traced_run([item])
        self.inline_steps += 1
        self._stepped(1, start, [key])
        if isinstance(result, BaseException):
            raise result
        return result, 0

    async def submit(self, item: Req, key: Hashable | None = None) -> tuple[Res, int]:
        """Queue one item for the next batched step; returns (result, queue_ns). `key` names the
        session that submits it: the batcher then learns how soon it comes back after a step and
        holds the next step briefly for it (`release(key)` when the session ends)."""
        if self.failed is not None:
            raise RuntimeError(f"{self.name} is broken: {self.failed}")
        now = time.perf_counter_ns()
        self._arrived_ns = now
        if key is not None and (r := self._returners.get(key)) is not None and r.delivered_ns:
            r.back(now)
        if self._alone(key):
            return self._step_inline(item, key)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(item, fut, now, key))
        self._wake.set()
        return await fut

    def _note_step(self, ns: int) -> None:
        # the first steps, or ones far shorter than the average (the first was a prefill): taken as is
        if self._step_time.value == 0 or ns * 4 < self._step_time.value:
            self._step_time.value = float(ns)
        else:
            self._step_time.update(float(ns))

    @property
    def gather_window_ns(self) -> float:
        """The longest the next step may wait for returning sessions."""
        return self.gather * self._step_time.value

    def release(self, key: Hashable) -> None:
        """The session `key` submits no more: the next step does not wait for it."""
        if self._returners.pop(key, None) is not None:
            self._wake.set()

    def _awaited_until(self, window_ns: float) -> int:
        """Until when the next step waits (0: not at all): for each session of the last step
        that is still out and usually back within the window, its usual gap twice over plus a
        margin, so that one slower this time (it asked the draft, say) costs only a little."""
        now = time.perf_counter_ns()
        margin = window_ns / 5
        end = max((r.delivered_ns + (min(window_ns, 2 * r.gap_ns + margin) if r.gap_ns else window_ns)
                   for r in self._returners.values() if r.delivered_ns and r.gap_ns <= window_ns), default=0)
        return int(end) if end > now else 0

    async def _gather(self) -> None:
        """Hold the next step until the prompt sessions of the last one are queued again, or a
        fraction of a step has passed: merged, they share one step instead of taking turns."""
        window_ns = self.gather_window_ns
        if window_ns <= 0:
            return
        started = 0  # when this step began to wait (0: it has not)
        try:
            while len(self._pending) < self.max_batch and (until := self._awaited_until(window_ns)):
                if not started:
                    started = time.perf_counter_ns()
                    self.gather_waits += 1
                # the returns have gone quiet: the rest are late this time, do not wait the window out
                until = min(until, int(max(started, self._arrived_ns) + window_ns / 3))
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), (until - time.perf_counter_ns()) / 1e9)
                except asyncio.TimeoutError:  # noqa: UP041 - a distinct class before Python 3.11
                    self.gather_timeouts += 1
                    return
        finally:
            if started:
                self.gather_wait_ns += time.perf_counter_ns() - started

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                await self._gather()
                batch = [p for p in self._pending[: self.max_batch] if not p.future.cancelled()]
                del self._pending[: self.max_batch]
                if not batch:
                    continue
                start = time.perf_counter_ns()
                items = [p.item for p in batch]
                trace.mark(f"{self.name}.batch", len(items))
                try:
                    results = await self._on_worker(self._traced_run, items)
                except Exception as exc:  # noqa: BLE001 - delivered to each waiter
                    for p in batch:
                        if not p.future.done():
                            p.future.set_exception(exc)
                    continue
                # a cancelled session does not come back
                self._stepped(len(batch), start, [p.key for p in batch if p.key is not None and not p.future.cancelled()])
                trace.mark(f"{self.name}.resolve", len(batch))
                for p, r in zip(batch, results, strict=True):
                    if not p.future.done():
                        if isinstance(r, BaseException):
                            p.future.set_exception(r)
                        else:
                            p.future.set_result((r, start - p.enqueued_ns))

    def _stepped(self, size: int, start: int, keys: list[Hashable]) -> None:
        """A step of `size` items that began at `start` is done: count it, learn its time, and
        note that each of `keys`' sessions got its result now (it is out until it submits again)."""
        done = time.perf_counter_ns()
        self.steps += 1
        self.last_batch_size = size
        self._note_step(done - start)
        for key in keys:
            if (back := self._returners.get(key)) is None:
                self._returners[key] = _Returner(done)
            else:
                back.delivered_ns = done

    def _traced_run(self, items: list[Req]) -> list[Res | BaseException]:
        trace.mark(f"{self.name}.step_start", len(items))
        try:
            return self._run(items)
        finally:
            trace.mark(f"{self.name}.step_end", len(items))

    def _run(self, items: list[Req]) -> list[Res | BaseException]:
        """One batched step; if it fails on bad input, isolate the culprit by stepping singly."""
        try:
            return list(self._step(items))
        except (ValueError, KeyError, RuntimeError) as exc:
            if len(items) == 1 or _is_device_failure(exc):
                if _is_device_failure(exc):
                    self.failed = exc
                return [exc] * len(items)
            out: list[Res | BaseException] = []
            for it in items:
                try:
                    out.extend(self._step([it]))
                except Exception as e:  # noqa: BLE001 - per-item status
                    out.append(e)
            return out


def _is_device_failure(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("CUDA error" in text or "device-side assert" in text)
