"""Undecodable request bytes get INVALID_ARGUMENT, not grpc's default UNKNOWN.

grpc-python answers a request its protobuf deserializer cannot parse with UNKNOWN
("Unexpected DecodeError"), which says "server bug" to clients and alerting alike. This
interceptor wraps every method's deserializer: a message that does not parse becomes a
marker, and the method aborts with INVALID_ARGUMENT before the servicer sees it (for a
stream: when the servicer reads that message, so the session's own cleanup still runs).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc


class _Malformed:
    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


async def _reject(m: _Malformed, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request message: {m.reason}")


def _safe(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def run(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as e:  # noqa: BLE001 - DecodeError and friends: the client's bytes are bad
            return _Malformed(f"{type(e).__name__}: {e}"[:200])
    return run


def _unary_in(behavior: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a handler that takes one request (unary-unary or unary-stream)."""
    if inspect.isasyncgenfunction(behavior):
        async def gen(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, _Malformed):
                await _reject(request, context)
            async for item in behavior(request, context):
                yield item
        return gen

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Malformed):
            await _reject(request, context)
        return await behavior(request, context)
    return call


def _stream_in(behavior: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a handler that reads a request stream (stream-unary or stream-stream)."""
    async def checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for m in requests:
            if isinstance(m, _Malformed):
                await _reject(m, context)
            yield m

    if inspect.isasyncgenfunction(behavior):
        async def gen(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for item in behavior(checked(requests, context), context):
                yield item
        return gen

    async def call(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        return await behavior(checked(requests, context), context)
    return call


class RejectMalformed(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        h = await continuation(handler_call_details)
        if h is None or h.request_deserializer is None:
            return h
        de, ser = _safe(h.request_deserializer), h.response_serializer
        if h.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(_unary_in(h.unary_unary), de, ser)
        if h.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(_unary_in(h.unary_stream), de, ser)
        if h.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(_stream_in(h.stream_unary), de, ser)
        if h.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(_stream_in(h.stream_stream), de, ser)
        return h
