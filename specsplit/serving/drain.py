"""Graceful drain on SIGTERM, shared by every server: refuse new calls, finish or hand back the rest.

Kubernetes sends SIGTERM, keeps the pod for `terminationGracePeriodSeconds`, then SIGKILLs
it. `Drain` is a server interceptor that counts the calls in flight. Once `begin()` has run,
new calls (except health checks and reflection, so probes keep answering NOT_SERVING) get
UNAVAILABLE with a message that says why; calls in flight keep running. After the grace
period, `hand_back()` ends every call still running with UNAVAILABLE: a tier session ends
between rounds or in the middle of one, and the gateway, which owns every sequence's tokens,
re-opens it on another replica. The server can then stop and the process exit 0.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

log = logging.getLogger(__name__)

EXEMPT_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                   "grpc.reflection.v1.ServerReflection")
REFUSED = "the server is shutting down and takes no new calls; retry on another replica"
HANDED_BACK = "the server is shutting down: its grace period ended before this call did; retry on another replica"


class Drain(grpc.aio.ServerInterceptor):
    """Counts in-flight calls; refuses new ones once draining; ends the rest on `hand_back()`."""

    def __init__(self) -> None:
        self.draining = False
        self._tasks: set[asyncio.Task] = set()  # the handler task of each call in flight
        self._handed_back: set[asyncio.Task] = set()
        self._idle: asyncio.Event | None = None

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def begin(self) -> None:
        """From now on new calls get UNAVAILABLE (idempotent)."""
        if not self.draining:
            log.info("draining: no new calls; %d in flight", self.in_flight)
        self.draining = True

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no call is in flight, at most `timeout_s`; True if none is left."""
        if self._tasks:
            self._idle = self._idle or asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), max(0.0, timeout_s))
            except asyncio.TimeoutError:
                pass
        return not self._tasks

    def hand_back(self) -> int:
        """End every call still in flight with UNAVAILABLE; returns how many were ended."""
        n = 0
        for task in list(self._tasks):
            if task not in self._handed_back and not task.done():
                self._handed_back.add(task)
                task.cancel()
                n += 1
        if n:
            log.warning("grace period over: handed back %d call(s) in flight (UNAVAILABLE)", n)
        return n

    # ---- bookkeeping of one call ---------------------------------------------------------------
    def _enter(self) -> asyncio.Task | None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        return task

    def _exit(self, task: asyncio.Task | None) -> None:
        if task is not None:
            self._tasks.discard(task)
            self._handed_back.discard(task)
        if not self._tasks and self._idle is not None:
            self._idle.set()

    async def _handed_back_abort(self, task: asyncio.Task | None, context: grpc.aio.ServicerContext) -> bool:
        """After a CancelledError: if `hand_back` caused it, abort with UNAVAILABLE (raises);
        False if the client cancelled (the caller re-raises)."""
        if task is None or task not in self._handed_back:
            return False
        uncancel = getattr(task, "uncancel", None)  # 3.11+: clear the request so abort can await
        if uncancel is not None:
            uncancel()
        await context.abort(grpc.StatusCode.UNAVAILABLE, HANDED_BACK)
        return True

    def _wrap(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(behavior):
            async def gen(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if self.draining:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, REFUSED)
                task = self._enter()
                try:
                    async for item in behavior(request, context):
                        yield item
                except asyncio.CancelledError:
                    if not await self._handed_back_abort(task, context):
                        raise
                finally:
                    self._exit(task)
            return gen

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if self.draining:
                await context.abort(grpc.StatusCode.UNAVAILABLE, REFUSED)
            task = self._enter()
            try:
                return await behavior(request, context)
            except asyncio.CancelledError:
                if not await self._handed_back_abort(task, context):
                    raise
            finally:
                self._exit(task)
        return call

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        h = await continuation(details)
        service = details.method.lstrip("/").split("/", 1)[0]
        if h is None or service in EXEMPT_SERVICES:
            return h
        de, ser = h.request_deserializer, h.response_serializer
        if h.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._wrap(h.unary_unary), de, ser)
        if h.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(self._wrap(h.unary_stream), de, ser)
        if h.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(self._wrap(h.stream_unary), de, ser)
        if h.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(self._wrap(h.stream_stream), de, ser)
        return h
