"""Replica pools and per-session streams to the draft and target tiers.

A `ReplicaPool` holds one channel per replica address, counts live sessions per replica
and hands out the least loaded healthy one. A `TierSession` is one bidirectional stream
(open = prefill on the replica; each request is one round; closing frees the replica's KV).
Any transport failure becomes a `TierFailure` so the speculation loop can move the session.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

from specsplit.serving.grpc_server import channel_options
from specsplit.serving.tls import ClientTLS, aio_channel

log = logging.getLogger(__name__)

# statuses after which the same session on another replica may succeed
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL,
             grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ABORTED}


class TierFailure(Exception):
    def __init__(self, tier: str, address: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{tier} replica {address}: {code.name}: {details}")
        self.tier, self.address, self.code, self.details = tier, address, code, details

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE


class NoReplica(Exception):
    """Every replica of a tier is down or excluded."""


class ReplicaPool:
    """Least-loaded routing over a changing set of replica addresses."""

    def __init__(self, tier: str, stub_factory: Callable[[grpc.aio.Channel], Any], cooldown_s: float = 5.0,
                 tls: ClientTLS | None = None) -> None:
        self.tier = tier
        self._stub_factory = stub_factory
        self.tls = tls  # None: plaintext channels
        self.cooldown_s = cooldown_s
        self.addresses: list[str] = []
        self.load: dict[str, int] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, Any] = {}
        self._failed_at: dict[str, float] = {}

    def set_addresses(self, addresses: list[str]) -> None:
        """Replace the replica set (discovery); new sessions see the change at once."""
        gone = set(self.addresses) - set(addresses)
        self.addresses = list(addresses)
        for a in addresses:
            self.load.setdefault(a, 0)
        for a in gone:
            ch = self._channels.pop(a, None)
            self._stubs.pop(a, None)
            if ch is not None:
                # live sessions on it fail over when their stream breaks
                asyncio.ensure_future(ch.close(grace=None))
        log.info("%s replicas: %s", self.tier, addresses)

    def stub(self, address: str) -> Any:
        if address not in self._stubs:
            ch = aio_channel(address, self.tls, channel_options())
            self._channels[address] = ch
            self._stubs[address] = self._stub_factory(ch)
        return self._stubs[address]

    def healthy(self, exclude: set[str] = frozenset()) -> list[str]:
        """Replicas not excluded, not failed within the cooldown, and whose channel is not known
        to be down (gRPC keeps reconnecting a TRANSIENT_FAILURE channel in the background, so a
        replica that comes back is healthy again within its reconnect backoff, ~1 s)."""
        now = time.monotonic()
        return [a for a in self.addresses
                if a not in exclude and now - self._failed_at.get(a, -1e9) >= self.cooldown_s
                and not self._down(a)]

    def _down(self, address: str) -> bool:
        ch = self._channels.get(address)
        return ch is not None and ch.get_state() == grpc.ChannelConnectivity.TRANSIENT_FAILURE

    def acquire(self, exclude: set[str] = frozenset()) -> str:
        candidates = self.healthy(exclude) or [a for a in self.addresses if a not in exclude]
        if not candidates:
            raise NoReplica(f"no {self.tier} replica available (known: {self.addresses or 'none'})")
        best = min(candidates, key=lambda a: (self.load.get(a, 0), self._failed_at.get(a, 0.0)))
        self.load[best] = self.load.get(best, 0) + 1
        return best

    def release(self, address: str) -> None:
        if self.load.get(address, 0) > 0:
            self.load[address] -= 1

    def mark_failed(self, address: str) -> None:
        self._failed_at[address] = time.monotonic()

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close(grace=None)
        self._channels.clear()
        self._stubs.clear()


class TierSession:
    """One session stream on one replica; requests are answered in order."""

    def __init__(self, pool: ReplicaPool, address: str, timeout_s: float) -> None:
        self.pool = pool
        self.address = address
        self.call = pool.stub(address).Session(timeout=timeout_s, wait_for_ready=False)
        self._lock = asyncio.Lock()
        self.closed = False
        self.progress: tuple[int, int] | None = None  # (prefilled, total): last progress report of this round

    async def send(self, msg: Any) -> None:
        try:
            await self.call.write(msg)
        except grpc.aio.AioRpcError as e:
            raise self._failure(e) from None
        except asyncio.InvalidStateError:
            raise await self._final_failure() from None

    async def request(self, msg: Any, timeout_s: float) -> Any:
        """Send one round and wait for its answer.

        The deadline covers the write (a stalled link) and then each message read: a replica
        prefilling a long prompt in chunks sends progress reports, each of which restarts it, so
        a slow replica is told from a hung one and no round is unbounded.
        """
        async with self._lock:
            self.progress = None
            await self._within(self.send(msg), timeout_s)
            while True:
                resp = await self._within(self._read(), timeout_s)
                if resp.WhichOneof("kind") != "progress":
                    return resp
                self.progress = (resp.progress.prefilled, resp.progress.total)
                log.debug("%s replica %s: prefilled %d of %d tokens", self.pool.tier, self.address, *self.progress)

    async def _within(self, step: Any, timeout_s: float) -> Any:
        try:
            return await asyncio.wait_for(step, timeout_s)
        except asyncio.TimeoutError:
            self.call.cancel()
            done = f" after prefilling {self.progress[0]} of {self.progress[1]} tokens" if self.progress else ""
            raise TierFailure(self.pool.tier, self.address, grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"no answer and no progress for {timeout_s:.1f}s{done} (round timeout)") from None

    async def _read(self) -> Any:
        try:
            resp = await self.call.read()
        except grpc.aio.AioRpcError as e:
            raise self._failure(e) from None
        if resp is grpc.aio.EOF:
            raise await self._final_failure()
        return resp

    async def _final_failure(self) -> TierFailure:
        try:
            code = await self.call.code()
            details = await self.call.details()
        except Exception:  # noqa: BLE001
            code, details = grpc.StatusCode.UNAVAILABLE, "stream ended"
        if code == grpc.StatusCode.OK:
            code, details = grpc.StatusCode.UNAVAILABLE, "stream ended early"
        return TierFailure(self.pool.tier, self.address, code, details or "")

    def _failure(self, e: grpc.aio.AioRpcError) -> TierFailure:
        return TierFailure(self.pool.tier, self.address, e.code(), e.details() or "")

    async def close(self) -> None:
        """Half-close then cancel: the replica frees the session's KV cache either way."""
        if self.closed:
            return
        self.closed = True
        self.pool.release(self.address)
        try:
            await self.call.done_writing()
        except Exception:  # noqa: BLE001 - already broken
            pass
        self.call.cancel()
