"""The speculation loop of one completion, run by the gateway against remote tiers.

The gateway owns the ground truth (`Sequence`: prompt + committed tokens), so the tiers'
KV caches are soft state: when a replica fails mid-generation, the session is re-opened on
another replica with every committed token and the round is re-run; the client sees
neither a gap nor a duplicate because only committed tokens are ever emitted.

Pipelining (DESIGN.md): while the target verifies block i, the draft already proposes
block i+1 assuming block i is fully accepted; its first proposed token is its guess of
the target's bonus token. If both hold, block i+1 is ready at once; otherwise it is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from gateway.tiers import NoReplica, ReplicaPool, TierFailure, TierSession
from specsplit.outputs import SpecMetrics
from specsplit.proto.v1 import common_pb2, draft_pb2, target_pb2
from specsplit.serving.convert import logprobs_from_pb, params_to_pb
from specsplit.serving.errors import Overloaded, Unavailable
from specsplit.speculation.adaptive import AdaptiveK, CostModel
from specsplit.speculation.sequence import Sequence

log = logging.getLogger(__name__)

# a tier that refuses these would refuse them on every replica: the request itself is at fault
CALLER_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.FAILED_PRECONDITION}


def backoff_s(attempt: int, base_s: float = 0.05, cap_s: float = 1.0) -> float:
    """Exponential backoff with jitter, so sessions preempted together do not return together."""
    return random.uniform(0.5, 1.0) * min(cap_s, base_s * 2 ** max(0, attempt - 1))


@dataclass
class LoopOptions:
    num_speculative_tokens: int = 5  # k_max
    adaptive: bool = True  # choose k per round from acceptance and costs
    pipeline: bool = True  # draft block i+1 while block i is verified
    round_timeout_s: float = 30.0  # a round slower than this counts as a failed replica
    session_timeout_s: float = 3600.0  # deadline of each tier stream
    max_failovers: int = 8  # failed re-opens in a row (no round in between) before UNAVAILABLE
    vocab_size: int = 0  # draft ids must be below this (0: unchecked); the target checks again
    kv_wait_s: float = 30.0  # a session a tier keeps refusing for lack of KV memory: RESOURCE_EXHAUSTED after this


@dataclass
class Delta:
    """What a completion adds in one round (sent to the client as one message)."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None  # first delta, when asked: [None, ...]


@dataclass
class LoopStats:
    metrics: SpecMetrics = field(default_factory=SpecMetrics)
    pipelined_rounds: int = 0
    draft_ns: int = 0
    verify_ns: int = 0
    overhead_ns: int = 0
    failovers: int = 0
    preemptions: int = 0  # sessions a tier dropped for lack of KV memory, re-opened later
    draft_fallback: bool = False

    def to_pb(self) -> common_pb2.SpecStats:
        m = self.metrics
        return common_pb2.SpecStats(
            drafted_tokens=m.num_drafted_tokens, accepted_tokens=m.num_accepted_tokens, rounds=m.num_rounds,
            pipelined_rounds=self.pipelined_rounds, acceptance_rate=m.acceptance_rate,
            mean_accepted_length=m.mean_accepted_length, draft_ns=self.draft_ns, verify_ns=self.verify_ns,
            overhead_ns=self.overhead_ns, draft_fallback=self.draft_fallback,
        )


def check_proposal(prop: draft_pb2.DraftProposal, k: int, vocab_size: int, address: str) -> None:
    """A draft replica's answer must fit the request: at most k ids, all in the vocabulary, one q
    per id when sampling. The target checks again, but a faulty draft is the draft's failure
    (the session moves on or falls back to plain decoding), not the request's."""
    ids = prop.token_ids
    bad = len(ids) > k or (vocab_size > 0 and any(not 0 <= t < vocab_size for t in ids)) \
        or (len(prop.q) not in (0, len(ids)))
    if bad:
        raise TierFailure("draft", address, grpc.StatusCode.INTERNAL,
                          f"malformed proposal ({len(ids)} ids for k={k}, {len(prop.q)} distributions, "
                          f"ids must be in [0, {vocab_size})): the draft replica is faulty")


class CompletionLoop:
    def __init__(self, seq: Sequence, targets: ReplicaPool, drafts: ReplicaPool | None, costs: CostModel,
                 opts: LoopOptions) -> None:
        self.seq = seq
        self.targets = targets
        self.drafts = drafts
        self.costs = costs
        self.opts = opts
        # a seeded request keeps k fixed: k chosen from measured timings would change how many
        # random numbers each round draws, and with them the sampled tokens
        self.adaptive = AdaptiveK(opts.num_speculative_tokens if drafts is not None else 0,
                                  opts.adaptive and seq.params.seed is None)
        self.stats = LoopStats()
        self.target: TierSession | None = None
        self.draft: TierSession | None = None
        self.draft_valid = 0  # committed tokens the draft session holds
        self._round = 0
        self._bad_targets: set[str] = set()
        self._bad_drafts: set[str] = set()
        self._params_pb = params_to_pb(seq.params)
        self._failures_in_row = 0  # target failovers since the last good round
        self._kv_wait_since: float | None = None  # first KV refusal since the last good round
        self._kv_refusals = 0  # KV refusals since the last good round
        self._draft_pauses = 0  # draft KV refusals in a row
        self._draft_retry_at = 0.0  # monotonic time before which no draft session is re-opened

    # ---- sessions --------------------------------------------------------------------------
    async def _open_target(self) -> None:
        while True:
            try:
                addr = self.targets.acquire(self._bad_targets)
            except NoReplica as e:
                raise Unavailable(str(e)) from None
            s = TierSession(self.targets, addr, self.opts.session_timeout_s)
            try:
                await s.send(target_pb2.TargetClientMessage(open=target_pb2.TargetOpen(
                    token_ids=self.seq.all_ids, params=self._params_pb, prompt_len=len(self.seq.prompt_ids))))
                self.target = s
                return
            except TierFailure as f:
                await self._drop(s, f, self.targets, self._bad_targets)

    async def _open_draft(self) -> bool:
        """Open a draft session; False (plain decoding from now on) when no draft replica is left."""
        while self.drafts is not None:
            try:
                addr = self.drafts.acquire(self._bad_drafts)
            except NoReplica:
                self._fall_back("no draft replica left")
                return False
            s = TierSession(self.drafts, addr, self.opts.session_timeout_s)
            try:
                await s.send(draft_pb2.DraftClientMessage(open=draft_pb2.DraftOpen(
                    token_ids=self.seq.all_ids, params=self._params_pb, prompt_len=len(self.seq.prompt_ids))))
                self.draft = s
                self.draft_valid = len(self.seq.all_ids)
                return True
            except TierFailure as f:
                await self._drop(s, f, self.drafts, self._bad_drafts)
        return False

    def _fall_back(self, why: str) -> None:
        """The draft tier is optional: finish this completion with plain target decoding."""
        log.warning("%s: completing with plain target decoding", why)
        self.stats.draft_fallback = True
        self.drafts = None
        self.draft = None
        self.adaptive.k_max = 0

    async def _drop(self, s: TierSession, f: TierFailure, pool: ReplicaPool, bad: set[str]) -> None:
        """A session broke: close it and decide where (and when) it is re-opened, or give up."""
        await s.close()
        if not f.retryable:
            if pool.tier == "draft":
                self._fall_back(f"the draft tier refused the session ({f})")
                return
            if f.code in CALLER_ERRORS:
                raise ValueError(str(f)) from None
            raise Unavailable(str(f)) from None
        self.stats.failovers += 1
        log.warning("%s; re-opening the session on another replica", f)
        pool.mark_failed(f.address)
        bad.add(f.address)
        if pool.tier == "draft":
            return  # optional tier: once every replica failed, _open_draft falls back to plain decoding
        self._failures_in_row += 1
        if self._failures_in_row > self.opts.max_failovers:
            raise Unavailable(f"gave up after {self._failures_in_row} failed attempts; last: {f}") from None
        if not pool.healthy(bad):
            # every replica failed once: retry them all (one may be back) after a backoff, so a
            # tier that is down costs a few seconds of retries and then UNAVAILABLE, never a hang
            bad.clear()
            await asyncio.sleep(backoff_s(self._failures_in_row))

    async def _wait_for_kv(self, s: TierSession, f: TierFailure) -> None:
        """The target had no KV memory for this session (new, or preempted): re-open it later.

        Not a replica failure: the replica stays in rotation and no failover is counted. The
        re-open re-sends prompt + committed tokens, so a preempted session resumes where it was.
        """
        await s.close()
        self.stats.preemptions += 1
        self._kv_refusals += 1
        now = time.monotonic()
        if self._kv_wait_since is None:
            self._kv_wait_since = now
        if now - self._kv_wait_since > self.opts.kv_wait_s:
            raise Overloaded(f"no target replica had KV memory for this request within "
                             f"{self.opts.kv_wait_s:.0f}s; retry later ({f.details})")
        log.info("%s; re-opening the session after a backoff", f)
        await asyncio.sleep(backoff_s(self._kv_refusals, cap_s=2.0))

    async def close(self) -> None:
        for s in (self.target, self.draft):
            if s is not None:
                await s.close()

    # ---- rounds ----------------------------------------------------------------------------
    async def _propose(self, prefix_len: int, new_tokens: list[int], k: int,
                       speculative: bool = False) -> draft_pb2.DraftProposal | None:
        """One draft round; None if the draft tier is gone (the loop then decodes plainly).

        On a draft failure the session is re-opened elsewhere with the committed tokens; a
        speculative (pipelined) request is then dropped, since it assumed unverified tokens.
        """
        # a pipelined request assumed the live session; after a KV refusal, wait a while
        if self.draft is None and (speculative or time.monotonic() < self._draft_retry_at
                                   or not await self._open_draft()):
            return None
        while self.draft is not None:
            self._round += 1
            msg = draft_pb2.DraftClientMessage(propose=draft_pb2.DraftPropose(
                round_id=self._round, prefix_len=prefix_len, new_tokens=new_tokens, k=k))
            try:
                resp = await self.draft.request(msg, self.opts.round_timeout_s)
                check_proposal(resp.proposal, k, self.opts.vocab_size, self.draft.address)
                self._draft_pauses = 0
                return resp.proposal
            except TierFailure as f:
                s, self.draft = self.draft, None
                if f.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    # the draft's KV is full: decode plainly for a while, then re-open the session
                    await s.close()
                    self.stats.preemptions += 1
                    self._draft_pauses += 1
                    self._draft_retry_at = time.monotonic() + backoff_s(self._draft_pauses, cap_s=2.0)
                    return None
                await self._drop(s, f, self.drafts, self._bad_drafts)  # type: ignore[arg-type]
                if speculative or not await self._open_draft():
                    return None
                prefix_len, new_tokens = len(self.seq.all_ids), []  # the new session holds these
        return None

    async def _verify(self, block: list[int], q: list[common_pb2.SparseDistribution]) -> target_pb2.VerifyResult:
        while True:
            if self.target is None:
                await self._open_target()
            self._round += 1
            msg = target_pb2.TargetClientMessage(verify=target_pb2.TargetVerify(
                round_id=self._round, draft_ids=block, q=q))
            try:
                resp = await self.target.request(msg, self.opts.round_timeout_s)  # type: ignore[union-attr]
                self._failures_in_row = self._kv_refusals = 0
                self._kv_wait_since = None
                return resp.result
            except TierFailure as f:
                s, self.target = self.target, None
                if f.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    await self._wait_for_kv(s, f)  # type: ignore[arg-type]
                else:
                    await self._drop(s, f, self.targets, self._bad_targets)  # type: ignore[arg-type]

    def _room(self) -> int:
        """The longest block worth verifying: the round's own token must still fit after it."""
        seq = self.seq
        return max(0, min(seq.max_new_tokens() - 1, seq.max_model_len - len(seq.all_ids) - 1))

    def _choose_k(self) -> int:
        return self.adaptive.choose(self.costs, self._room()) if self.drafts is not None else 0

    async def run(self) -> AsyncIterator[Delta]:
        """Generate until the sequence finishes, yielding each round's committed delta."""
        seq = self.seq
        await self._open_target()
        if self.drafts is not None:
            await self._open_draft()
        block: list[int] = []
        q: list[common_pb2.SparseDistribution] = []
        spec: asyncio.Task | None = None
        spec_k = 0
        # first round: prefill with no block; the draft guesses [first token] + block meanwhile
        k = self._choose_k()
        if self.drafts is not None and self.opts.pipeline and k > 0:
            spec = asyncio.ensure_future(self._propose(len(seq.all_ids), [], k + 1, speculative=True))
            spec_k = k
        try:
            while not seq.finished:
                t_round = time.perf_counter_ns()
                before = len(seq.all_ids)
                verify = asyncio.ensure_future(self._verify(block, q))
                if spec is None and self.opts.pipeline and self.draft is not None and block:
                    k_next = self._choose_k()
                    if k_next > 0:
                        spec = asyncio.ensure_future(self._propose(before + len(block), [], k_next + 1, speculative=True))
                        spec_k = k_next
                t0 = time.perf_counter_ns()
                res = await verify
                t_verify = time.perf_counter_ns() - t0
                self.stats.verify_ns += t_verify
                if res.prompt_logprobs and seq.prompt_logprobs is None:  # echo: the first result has them
                    seq.prompt_logprobs = [None, *(logprobs_from_pb(list(res.prompt_logprobs),
                                                                    seq.all_ids[1 : len(res.prompt_logprobs) + 1])
                                                   or [])][: len(seq.prompt_ids)]
                a = res.num_accepted
                emitted = list(block[:a]) + [res.next_token]
                lps = logprobs_from_pb(list(res.logprobs), emitted)
                kept, text = seq.commit(emitted, lps)
                m = self.stats.metrics
                m.num_drafted_tokens += len(block)
                m.num_accepted_tokens += min(a, len(kept))
                m.num_rounds += 1
                m.num_emitted_tokens += len(kept)
                if block:
                    self.adaptive.observe(len(block), a)
                self.costs.observe_verify(len(block), t_verify / 1e9)
                drafted_block = block
                yield Delta(seq.index, kept, text, lps[: len(kept)] if lps else None,
                            seq.finish_reason, seq.stop_reason)
                if seq.finished:
                    break
                if drafted_block:
                    self.draft_valid = before + a
                # next block: the pipelined guess if it holds, else a fresh proposal
                block, q = [], []
                t1 = time.perf_counter_ns()
                hit = False
                if spec is not None:
                    prop = await spec
                    spec = None
                    assumed_all = a == len(drafted_block)
                    if prop is not None and assumed_all and prop.token_ids and prop.token_ids[0] == res.next_token:
                        hit = True
                        # drafted before this round's tokens were committed: cut to what is left
                        n = min(spec_k, self._room())
                        block = list(prop.token_ids[1 : n + 1])
                        q = list(prop.q[1 : n + 1])
                        self.draft_valid = len(seq.all_ids)
                        self.stats.pipelined_rounds += 1
                if not hit and self.drafts is not None:
                    k = self._choose_k()
                    if k > 0:
                        catch_up = len(seq.all_ids) - self.draft_valid
                        t_prop = time.perf_counter_ns()
                        prop = await self._propose(self.draft_valid, seq.all_ids[self.draft_valid :], k)
                        if prop is not None:
                            self.draft_valid = len(seq.all_ids)
                            block, q = list(prop.token_ids), list(prop.q)
                            self.costs.observe_draft_call((time.perf_counter_ns() - t_prop) / 1e9,
                                                          max(1, len(prop.token_ids)), catch_up,
                                                          self.adaptive.k_max)
                t_end = time.perf_counter_ns()
                self.stats.draft_ns += t_end - t1
                self.stats.overhead_ns += max(0, (t_end - t_round) - t_verify - (t_end - t1))
        finally:
            if spec is not None:
                spec.cancel()
