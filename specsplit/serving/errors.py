"""Exceptions become gRPC statuses in one place, each kind to its own status code."""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Callable
from typing import Any

import grpc

from specsplit.runtime.kv_cache import OutOfKVMemory
from specsplit.speculation.session import UnknownSession

log = logging.getLogger(__name__)


class Unavailable(RuntimeError):
    """A tier needed for the request cannot be reached (no replica left)."""


class Overloaded(RuntimeError):
    """Admission control refused the request (queue full)."""


class RateLimited(Overloaded):
    """A per-API-key limit refused the request; `retry_after_s` is when trying again makes sense."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unauthenticated(RuntimeError):
    """No valid API key (the message never contains the key that was sent)."""


def retry_after(exc: BaseException) -> int | None:
    """Whole seconds to wait before a retry, for Retry-After / `retry-after` metadata."""
    if isinstance(exc, RateLimited):
        return max(1, math.ceil(exc.retry_after_s))
    if isinstance(exc, Overloaded):
        return 1
    return None


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map an exception to (code, message); unknown exceptions are INTERNAL."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code(), exc.details() or ""
    if isinstance(exc, UnknownSession):
        return grpc.StatusCode.NOT_FOUND, str(exc.args[0] if exc.args else exc)
    if isinstance(exc, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED, str(exc)
    if isinstance(exc, (OutOfKVMemory, Overloaded)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, Unavailable):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, (ValueError, TypeError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"


def grpc_errors(fn: Any) -> Any:
    """Decorate a servicer method (coroutine or async generator) to abort with a mapped status.

    An INTERNAL error calls the servicer's `on_internal_error(exc)` if it has one (the
    services use it to report NOT_SERVING when the device breaks).
    """

    async def fail(self: Any, context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        code, msg = status_for(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("internal error in %s", fn.__qualname__)
            hook: Callable[[BaseException], None] | None = getattr(self, "on_internal_error", None)
            if hook is not None:
                hook(exc)
        wait = retry_after(exc)
        await context.abort(code, msg, trailing_metadata=(("retry-after", str(wait)),) if wait else ())


    if inspect.isasyncgenfunction(fn):
        @functools.wraps(fn)
        async def gen(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                async for item in fn(self, request, context):
                    yield item
            except (grpc.aio.AbortError, GeneratorExit):
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to a status
                await fail(self, context, exc)
        return gen

    @functools.wraps(fn)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status
            await fail(self, context, exc)
    return unary
