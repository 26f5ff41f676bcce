"""StepBatcher: gathers requests from many sessions and runs them as one batched step.

Every touch of a model (open, step, close) runs on one worker thread, in submission order,
so the engine objects need no locks and the asyncio loop keeps serving streams while a
forward pass runs. Requests that arrive during a step form the next batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Res = TypeVar("Res")


@dataclass
class _Pending(Generic[Req]):
    item: Req
    future: asyncio.Future
    enqueued_ns: int


class StepBatcher(Generic[Req, Res]):
    def __init__(self, step: Callable[[list[Req]], list[Res]], *, max_batch: int = 64, name: str = "step") -> None:
        self._step = step
        self.max_batch = max_batch
        self.name = name
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"specsplit-{name}")
        self._pending: list[_Pending[Req]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.steps = 0
        self.last_batch_size = 0
        self.failed: BaseException | None = None  # set when the device broke (INTERNAL)

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
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def submit(self, item: Req) -> tuple[Res, int]:
        """Queue one item for the next batched step; returns (result, queue_ns)."""
        if self.failed is not None:
            raise RuntimeError(f"{self.name} is broken: {self.failed}")
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        p = _Pending(item, fut, time.perf_counter_ns())
        self._pending.append(p)
        self._wake.set()
        return await fut

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = [p for p in self._pending[: self.max_batch] if not p.future.cancelled()]
                del self._pending[: self.max_batch]
                if not batch:
                    continue
                start = time.perf_counter_ns()
                items = [p.item for p in batch]
                try:
                    results = await loop.run_in_executor(self._executor, self._run, items)
                except Exception as exc:  # noqa: BLE001 - delivered to each waiter
                    for p in batch:
                        if not p.future.done():
                            p.future.set_exception(exc)
                    continue
                self.steps += 1
                self.last_batch_size = len(batch)
                for p, r in zip(batch, results, strict=True):
                    if not p.future.done():
                        if isinstance(r, BaseException):
                            p.future.set_exception(r)
                        else:
                            p.future.set_result((r, start - p.enqueued_ns))

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
