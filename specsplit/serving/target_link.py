"""The target side of a completion: a session in this process or a stream to a replica.

`CompletionLoop` verifies each block through a `TargetLink`. In the direct round the target
tier's own verifier serves it (`target_service.generate.LocalTarget`); in the gateway-driven
round `RemoteTarget` streams to a replica and moves the session when the replica fails
(`Failover`, shared with the gateway's side of the direct round).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from torch import Tensor

from specsplit.outputs import SpecMetrics
from specsplit.proto.v1 import common_pb2, target_pb2
from specsplit.serving.convert import logprobs_from_pb, sparse_to_pb, verify_result_from_pb
from specsplit.serving.errors import Overloaded, Unavailable
from specsplit.serving.replicas import NoReplica, ReplicaPool, TierFailure, TierSession

if TYPE_CHECKING:
    from specsplit.serving.completion_loop import LoopOptions

log = logging.getLogger(__name__)

# a tier that refuses these would refuse them on every replica: the request itself is at fault
CALLER_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.FAILED_PRECONDITION}


def backoff_s(attempt: int, base_s: float = 0.05, cap_s: float = 1.0) -> float:
    """Exponential backoff with jitter, so sessions preempted together do not return together."""
    return random.uniform(0.5, 1.0) * min(cap_s, base_s * 2 ** max(0, attempt - 1))



Q = tuple[Tensor | None, Tensor | None]  # a block's draft distributions: ids, probs # [k, K]; (None, None) greedy


@dataclass
class Verdict:
    """The target's answer to one block."""

    num_accepted: int
    emitted: list[int]  # block[:num_accepted] + the target's own token (recovered or bonus)
    logprobs: list[dict[int, float]] | None  # per emitted token
    verify_ns: int = 0
    queue_ns: int = 0
    prompt_logprobs: list[dict[int, float]] | None = None  # the first verdict, when asked: tokens 1.. of the prompt
    hidden_states: bytes = b""  # EAGLE: the states of the positions fed up to the last accepted one (wire bytes)
    fresh: bool = False  # the session was (re)opened for this verify: its states start at position 0
    chunked: bool = False  # a long prompt was prefilled chunk by chunk first: not a verify's cost


class TargetLink(ABC):
    """The target side of one completion: a local session or a stream to a replica."""

    hidden_layers: tuple[int, ...] = ()  # EAGLE: the target layers whose states each verify returns
    _stop_states = False  # the next verify tells the session to compute no more states

    def stop_states(self) -> None:
        """The draft that read the states is gone (plain decoding from now on): the session stops
        computing and returning them from the next verify on, and a re-opened one asks for none."""
        if self.hidden_layers:
            self.hidden_layers, self._stop_states = (), True

    def _take_stop_states(self) -> bool:
        stop, self._stop_states = self._stop_states, False
        return stop

    @abstractmethod
    async def open(self) -> None:
        """Start the session with every committed token (prefilled by the first verify)."""

    @abstractmethod
    async def verify(self, block: list[int], q: Q) -> Verdict:
        """Verify `block` after the committed tokens (may be empty: a plain step)."""

    @abstractmethod
    async def close(self) -> None:
        """Free the session (idempotent)."""

    async def restart(self) -> None:
        """Re-open the session: the next verify prefills every committed token again and so
        returns every position's hidden states (a re-opened EAGLE draft rebuilds its head from them)."""
        await self.close()
        await self.open()



class Failover:
    """Which target replica a completion uses next, and when to give up.

    A broken session moves to another replica (a failover); a replica out of KV memory is not
    broken: the session waits and re-opens (a preemption). Shared by both kinds of round.
    """

    def __init__(self, pool: ReplicaPool, opts: LoopOptions, stats: SpecMetrics) -> None:
        self.pool, self.opts, self.stats = pool, opts, stats
        self.failures: dict[tuple[str, str], int] = {}  # (tier, status) -> broken sessions (a metric)
        self._bad: set[str] = set()
        # replicas where a round timed out: it would time out there again, so it is never re-run there
        self._timed_out: set[str] = set()
        self._failed_at: str | None = None  # the replica whose session broke, until one is open again
        self._failures_in_row = 0  # failovers since the last good round
        self._kv_wait_since: float | None = None  # first KV refusal since the last good round
        self._kv_refusals = 0  # KV refusals since the last good round

    def acquire(self) -> str:
        try:
            return self.pool.acquire(self._bad)
        except NoReplica as e:
            raise Unavailable(str(e)) from None

    def succeeded(self) -> None:
        self._failures_in_row = self._kv_refusals = 0
        self._kv_wait_since = None

    async def failed(self, f: TierFailure) -> None:
        """Wait as long as `f` asks before the next open, or raise when the request is lost."""
        if f.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            await self._wait_for_kv(f)
            return
        if not f.retryable:
            if f.code in CALLER_ERRORS:
                raise ValueError(str(f)) from None
            raise Unavailable(str(f)) from None
        key = (self.pool.tier, f.code.name)
        self.failures[key] = self.failures.get(key, 0) + 1
        log.warning("%s", f)
        self.pool.mark_failed(f.address)
        self._bad.add(f.address)
        self._failed_at = f.address
        if f.code == grpc.StatusCode.DEADLINE_EXCEEDED:
            # no progress for a whole round timeout: it would do the same again on that replica,
            # so the round is re-run only on another one
            self._timed_out.add(f.address)
        self._failures_in_row += 1
        if self._failures_in_row > self.opts.max_failovers:
            raise Unavailable(f"gave up after {self._failures_in_row} failed attempts; last: {f}") from None
        if not self.pool.healthy(self._bad):
            if not [a for a in self.pool.addresses if a not in self._timed_out]:
                raise Unavailable(f"{f}; no other {self.pool.tier} replica to move the session to (a round "
                                  "that timed out is not re-run on the replica where it did)") from None
            # every replica failed once: retry them all (one may be back) after a backoff, so a
            # tier that is down costs a few seconds of retries and then UNAVAILABLE, never a hang
            self._bad.clear()
            self._bad.update(self._timed_out)
            await asyncio.sleep(backoff_s(self._failures_in_row))

    def reopened(self, address: str) -> None:
        """A session starts on `address`: a failover if an earlier one broke on another replica."""
        failed, self._failed_at = self._failed_at, None
        if failed is None:
            return
        if failed != address:
            self.stats.num_failovers += 1
            log.warning("%s session moved from replica %s to %s", self.pool.tier, failed, address)
        else:
            log.warning("%s session re-opened on replica %s, where it failed (no other replica was up)",
                        self.pool.tier, address)

    async def _wait_for_kv(self, f: TierFailure) -> None:
        """Not a replica failure: the replica stays in rotation and no failover is counted. The
        re-open re-sends prompt + committed tokens, so a preempted session resumes where it was."""
        self.stats.num_preemptions += 1
        self._kv_refusals += 1
        now = time.monotonic()
        if self._kv_wait_since is None:
            self._kv_wait_since = now
        if now - self._kv_wait_since > self.opts.kv_wait_s:
            raise Overloaded(f"no target replica had KV memory for this request within "
                             f"{self.opts.kv_wait_s:.0f}s; retry later ({f.details})")
        log.info("%s; re-opening the session after a backoff", f)
        await asyncio.sleep(backoff_s(self._kv_refusals, cap_s=2.0))


class RemoteTarget(TargetLink):
    """A session stream to a target replica (the gateway-driven round)."""

    def __init__(self, pool: ReplicaPool, all_ids: Callable[[], list[int]], params_pb: common_pb2.TokenChoice,
                 opts: LoopOptions, stats: SpecMetrics, prompt_len: int) -> None:
        self.pool = pool
        self.prompt_len = prompt_len  # presence/frequency penalties count only what follows
        self.all_ids = all_ids  # the ground truth a re-opened session is prefilled with
        self.params_pb = params_pb
        self.opts = opts
        self.failover = Failover(pool, opts, stats)
        self.hidden_layers = opts.hidden_layers
        self.session: TierSession | None = None
        self._round = 0
        self._fresh = False  # the next verify is the session's first

    async def open(self) -> None:
        while True:
            s = TierSession(self.pool, self.failover.acquire(), self.opts.session_timeout_s)
            self.failover.reopened(s.address)
            try:
                await s.send(target_pb2.TargetClientMessage(open=target_pb2.TargetOpen(
                    token_ids=self.all_ids(), params=self.params_pb, prompt_len=self.prompt_len,
                    hidden_layers=self.hidden_layers)))
                self.session = s
                self._fresh = True
                return
            except TierFailure as f:
                await s.close()
                await self.failover.failed(f)

    async def verify(self, block: list[int], q: Q) -> Verdict:
        while True:
            if self.session is None:
                await self.open()
            self._round += 1
            msg = target_pb2.TargetClientMessage(verify=target_pb2.TargetVerify(
                round_id=self._round, draft_ids=block, q=sparse_to_pb(*q), stop_hidden_states=self._take_stop_states()))
            try:
                pb = (await self.session.request(msg, self.opts.round_timeout_s)).result  # type: ignore[union-attr]
                self.failover.succeeded()
                res = verify_result_from_pb(pb, 0, block)
                prompt = logprobs_from_pb(list(pb.prompt_logprobs), self.all_ids()[1 : len(pb.prompt_logprobs) + 1]) \
                    if pb.prompt_logprobs else None
                fresh, self._fresh = self._fresh, False
                return Verdict(res.num_accepted, res.emitted, res.logprobs, res.verify_ns, pb.queue_ns, prompt,
                               pb.hidden_states, fresh,
                               self.session.progress is not None)  # type: ignore[union-attr]
            except TierFailure as f:
                s, self.session = self.session, None
                await s.close()  # type: ignore[union-attr]
                await self.failover.failed(f)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def restart(self) -> None:
        s, self.session = self.session, None  # the next verify opens a new session
        if s is not None:
            await s.close()
