"""The speculation loop of one completion: draft a block, verify it, commit, repeat.

One loop, two places (docs/architecture.md, "Who drives the round"):
- the target tier runs it for the direct round (`LocalTarget`: its own batcher; the draft
  replica is a stream of its own), streaming each round's tokens to the gateway;
- the gateway runs it for the gateway-driven round (`RemoteTarget`: a stream to a target
  replica, with failover).
What a round does to the completion (k, commit, statistics) is `RoundBook`'s
(specsplit/speculation/round.py), shared with the in-process engine; this loop adds the RPCs.
Whoever calls it owns the ground truth (`Sequence`: prompt + committed tokens), so the
tiers' KV caches are soft state: when a replica fails mid-generation, the session is
re-opened on another replica with every committed token and the round is re-run; nothing
is lost or duplicated because only committed tokens are ever emitted.

Pipelining (docs/architecture.md, "The tree of guesses"): while the target verifies block i, the
draft already proposes block i+1 for the likely outcomes of that verify: all accepted and the
target's bonus token is the draft's own next token, or d_1..d_j accepted and the target's token
is the draft's runner-up at position j + 1. If the verdict is one of them, block i+1 is ready at
once (and the draft adopts that branch); otherwise the draft proposes afresh.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Collection, Iterable
from dataclasses import dataclass, fields

import grpc

from specsplit import trace
from specsplit.outputs import SpecMetrics
from specsplit.proto.v1 import common_pb2, draft_pb2
from specsplit.serving.convert import (
    sparse_from_pb,
    token_choice_to_pb,
)
from specsplit.serving.replicas import NoReplica, ReplicaPool, TierFailure, TierSession
from specsplit.serving.target_link import Q, RemoteTarget, TargetLink, Verdict, backoff_s
from specsplit.speculation.adaptive import AdaptiveK, CostModel
from specsplit.speculation.branches import MAX_BRANCHES, BranchProposal
from specsplit.speculation.drafters import Proposal
from specsplit.speculation.eagle.wire import tail_rows
from specsplit.speculation.round import RoundBook
from specsplit.speculation.sequence import Sequence
from specsplit.speculation.session import out_of_vocab

log = logging.getLogger(__name__)


@dataclass
class LoopOptions:
    num_speculative_tokens: int = 5  # k_max
    adaptive: bool = True  # choose k per round from acceptance and costs
    pipeline: bool = True  # draft block i+1 while block i is verified
    max_branches: int = 0  # outcomes of a verify drafted ahead for (the draft's likeliest); 0: all it guesses
    round_timeout_s: float = 30.0  # no answer nor progress report for this long: the replica failed
    session_timeout_s: float = 3600.0  # deadline of each tier stream
    max_failovers: int = 8  # failed re-opens in a row (no round in between) before UNAVAILABLE
    vocab_size: int = 0  # draft ids must be below this (0: unchecked); the target checks again
    kv_wait_s: float = 30.0  # a session a tier keeps refusing for lack of KV memory: RESOURCE_EXHAUSTED after this
    # EAGLE drafts: the target layers whose states each verify returns and the next propose carries
    # (empty: none); a block drafted ahead goes on from the head's own states (eagle/drafter.py)
    hidden_layers: tuple[int, ...] = ()
    hidden_row_bytes: int = 0  # wire size of one position's states (bf16: 2 * hidden_size * len(hidden_layers))


@dataclass
class RoundTiming:
    """Where one round's wall time went (ns), as the loop that ran it saw it."""

    round_ns: int = 0  # choosing the block .. tokens committed and the next block in hand
    verify_ns: int = 0  # the batched verify step that served it (the tier's own measure)
    verify_wait_ns: int = 0  # the loop waiting for the verdict (step + queue + transit)
    verify_queue_ns: int = 0  # the verify waiting for its batch to start
    draft_wait_ns: int = 0  # the loop waiting for a block after the verify (0: drafted ahead)
    draft_ns: int = 0  # the draft tier's own step time for that block
    draft_queue_ns: int = 0
    draft_handled_ns: int = 0  # the draft tier's whole handling of that request (the rest of the wait: transit)
    ahead_wait_ns: int = 0  # of draft_wait_ns: waiting for the block drafted ahead (matched or not)


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
    drafted: int = 0  # block length verified in this round
    accepted: int = 0
    pipelined: bool = False
    timing: RoundTiming | None = None
    draft_failure: str = ""  # the draft replica failed in this round (the loop went on plainly)
    drafted_ahead: bool = False  # a block had been drafted ahead for this round (pipelined: and it matched)


class RoundTimes:
    """Round timings summed over a completion, and the gateway's own relay time (benchmarks)."""

    def __init__(self) -> None:
        self.sum = RoundTiming()
        self.relay_ns = 0  # direct rounds: the gateway's own time per delta (commit, detokenize)

    def add(self, t: RoundTiming) -> None:
        for f in fields(t):
            setattr(self.sum, f.name, getattr(self.sum, f.name) + getattr(t, f.name))


def check_proposal(prop: draft_pb2.DraftProposal, k: int, vocab_size: int, address: str) -> Proposal:
    """A draft replica's answer, converted, must fit the request: at most k ids, all in the
    vocabulary, one valid q per id when sampling. The target checks again, but a faulty draft is
    the draft's failure (the session moves on or falls back to plain decoding), not the request's."""
    p = _checked_block(prop.token_ids, prop.q, k, vocab_size, address)
    p.draft_ns, p.queue_ns, p.prefilling, p.handled_ns = prop.draft_ns, prop.queue_ns, prop.prefilling, prop.handled_ns
    return p


def _checked_block(token_ids: Iterable[int], q: Collection[common_pb2.SparseDistribution], k: int,
                   vocab_size: int, address: str) -> Proposal:
    """One block of ids (and q rows) from the wire, checked. Runs for every branch of every
    drafted-ahead answer, on the loop that also serves every other session: no message is
    rebuilt per branch, and tensors are built only when there are distributions."""
    ids = list(token_ids)
    why = ""
    if len(ids) <= k and not (vocab_size > 0 and out_of_vocab(ids, vocab_size)) and len(q) in (0, len(ids)):
        if not q:
            return Proposal(ids)
        try:
            q_ids, q_probs = sparse_from_pb(list(q), len(ids), vocab_size or 2**32)
            return Proposal(ids, q_ids, q_probs)
        except ValueError as e:  # a q that is not a distribution over the vocabulary
            why = f"; {e}"
    raise TierFailure("draft", address, grpc.StatusCode.INTERNAL,
                      f"malformed proposal ({len(ids)} ids for k={k}, {len(q)} distributions, "
                      f"ids must be in [0, {vocab_size}){why}): the draft replica is faulty")


def check_branches(prop: draft_pb2.DraftProposal, block_len: int, k: int, vocab_size: int,
                   address: str) -> list[BranchProposal]:
    """A branch request's answer: each branch must name an outcome of the block (j <= block_len,
    c in the vocabulary) and carry a well-formed block, else the draft replica is faulty."""
    out = []
    for b in prop.branches:
        if b.accepted > block_len or (vocab_size > 0 and b.token >= vocab_size):
            raise TierFailure("draft", address, grpc.StatusCode.INTERNAL,
                              f"malformed branch (accepted {b.accepted} of {block_len}, token {b.token}): "
                              "the draft replica is faulty")
        out.append(BranchProposal(b.id, b.accepted, b.token, _checked_block(b.token_ids, b.q, k, vocab_size, address)))
    return out


class CompletionLoop:
    """Rounds of one completion against a target link and (optionally) a draft replica pool."""

    def __init__(self, seq: Sequence, target: TargetLink | ReplicaPool, drafts: ReplicaPool | None,
                 costs: CostModel, opts: LoopOptions, prompt_len: int | None = None) -> None:
        self.seq = seq
        # how many leading tokens are the prompt (a direct round's sequence starts with committed ones too)
        self.prompt_len = len(seq.prompt_ids) if prompt_len is None else prompt_len
        self.drafts = drafts
        self.costs = costs
        self.opts = opts
        self.stats = SpecMetrics()
        # k, commit and statistics of each round: the same bookkeeping as the in-process engine's
        self.book = RoundBook(seq, opts.num_speculative_tokens if drafts is not None else 0, opts.adaptive, self.stats)
        self.times = RoundTimes()
        self._params_pb = token_choice_to_pb(seq.params)
        self.target: TargetLink = target if isinstance(target, TargetLink) else \
            RemoteTarget(target, lambda: self.seq.all_ids, self._params_pb, opts, self.stats, self.prompt_len)
        # (tier, status) -> tier sessions that broke (a metric): the target's failover's and the draft's
        self.failures = self.target.failover.failures if isinstance(self.target, RemoteTarget) else {}
        self._states: list[bytes] = []  # EAGLE: target states verified since the last propose
        self._states_epoch = 0  # re-prefills so far (older states are void)
        self._draft_opened = False  # a draft session was opened before (a re-open rebuilds the head's states)
        self._restart_target = False  # the next verify re-prefills the target to send every state again
        self.draft: TierSession | None = None
        self._round = 0
        self._bad_drafts: set[str] = set()
        self._draft_pauses = 0  # draft KV refusals in a row
        self._draft_retry_at = 0.0  # monotonic time before which no draft session is re-opened
        self._draft_failure = ""  # reported with the next delta
        self._adopt: int | None = None  # the draft branch the last verdict matched, told with the next propose

    # ---- the draft session -----------------------------------------------------------------
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
                    token_ids=self.seq.all_ids, params=self._params_pb, prompt_len=self.prompt_len)))
                self.draft = s
                self.book.draft_valid = len(self.seq.all_ids)
                # a re-opened EAGLE draft has no head state: the target re-sends every position's
                # states with the next verify (one re-prefill); until then it drafts from the latest
                self._restart_target = self._draft_opened and bool(self.opts.hidden_layers)
                self._draft_opened = True
                self._adopt = None  # a new session has no branches
                return True
            except TierFailure as f:
                await self._drop_draft(s, f)
        return False

    def _fall_back(self, why: str) -> None:
        """The draft tier is optional: finish this completion with plain target decoding."""
        log.warning("%s: completing with plain target decoding", why)
        self.stats.draft_fallback = True
        self.drafts = None
        self.draft = None
        self.adaptive.k_max = 0
        self._restart_target = False  # no head left to rebuild
        self.target.stop_states()  # EAGLE: no draft reads the target's states any more

    async def _drop_draft(self, s: TierSession, f: TierFailure) -> None:
        """A draft session broke: try another replica (the next open), or decode plainly."""
        await s.close()
        self._draft_failure = str(f)
        if not f.retryable:
            self._fall_back(f"the draft tier refused the session ({f})")
            return
        key = ("draft", f.code.name)
        self.failures[key] = self.failures.get(key, 0) + 1
        self.stats.num_failovers += 1
        log.warning("%s; re-opening the draft session on another replica", f)
        self.drafts.mark_failed(f.address)  # type: ignore[union-attr]
        self._bad_drafts.add(f.address)

    @property
    def adaptive(self) -> AdaptiveK:
        """This completion's adaptive k (the round book's); falling back to plain decoding zeroes its k_max."""
        return self.book.adaptive

    async def close(self) -> None:
        await self.target.close()
        if self.draft is not None:
            await self.draft.close()

    # ---- rounds ----------------------------------------------------------------------------
    async def _propose(self, prefix_len: int, new_tokens: list[int], k: int,
                       block_len: int | None = None) -> Proposal | None:
        """One draft round; None if the draft tier is gone (the loop then decodes plainly).

        `block_len` set: a speculative (pipelined) request, drafting k tokens ahead for each
        likely outcome of verifying the last block_len tokens (Proposal.branches). On a draft
        failure the session is re-opened elsewhere with the committed tokens; a speculative
        request is then dropped, since it assumed unverified tokens.
        """
        speculative = block_len is not None
        # a pipelined request assumed the live session; after a KV refusal, wait a while
        if self.draft is None and (speculative or time.monotonic() < self._draft_retry_at
                                   or not await self._open_draft()):
            return None
        while self.draft is not None:
            self._round += 1
            # EAGLE: the states verified since the last propose; a verdict that arrives meanwhile adds its own
            sent, self._states, epoch = self._states, [], self._states_epoch
            msg = draft_pb2.DraftPropose(round_id=self._round, prefix_len=prefix_len, new_tokens=new_tokens, k=k,
                                         hidden_states=self._wire_states(sent))
            if self._adopt is not None:
                msg.adopt_branch, self._adopt = self._adopt, None
            if block_len is not None:
                msg.branches.block_len, msg.branches.max_branches = block_len, self.opts.max_branches or MAX_BRANCHES
            try:
                trace.mark("loop.draft_send", self._round)
                resp = await self.draft.request(draft_pb2.DraftClientMessage(propose=msg), self.opts.round_timeout_s)
                trace.mark("loop.draft_answer", self._round)
                prop = check_proposal(resp.proposal, k, self.opts.vocab_size, self.draft.address)
                if block_len is not None:
                    prop.branches = check_branches(resp.proposal, block_len, k, self.opts.vocab_size, self.draft.address)
                self._draft_pauses = 0
                return prop
            except TierFailure as f:
                if epoch == self._states_epoch:  # not delivered: the next propose carries them (unless re-prefilled)
                    self._states = sent + self._states
                s, self.draft = self.draft, None
                if f.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    # the draft's KV is full: decode plainly for a while, then re-open the session
                    await s.close()
                    self.stats.num_preemptions += 1
                    self._draft_pauses += 1
                    self._draft_retry_at = time.monotonic() + backoff_s(self._draft_pauses, cap_s=2.0)
                    return None
                await self._drop_draft(s, f)
                if speculative or not await self._open_draft():
                    return None
                prefix_len, new_tokens = len(self.seq.all_ids), []  # the new session holds these
        return None

    def _choose_k(self) -> int:
        return self.book.choose_k(self.costs, self.drafts is not None)

    async def run(self) -> AsyncIterator[Delta]:
        """Generate until the sequence finishes, yielding each round's committed delta."""
        seq = self.seq
        # the load governor weighs the completions its decision changes: adaptive k with a draft
        governed = self.drafts is not None and self.book.adaptive.enabled
        # a draft session is opened when drafting may happen: while the governor holds this load to
        # plain rounds it is opened later, beside a verify, if ever (an EAGLE head opens at once: it
        # reads every position's target states from the first verify on)
        lazy_draft = governed and not self.opts.hidden_layers and self.opts.pipeline
        await self.target.open()
        if self.drafts is not None and (not lazy_draft or self.costs.governor.allows_drafting()):
            await self._open_draft()
        block: list[int] = []
        q: Q = (None, None)
        spec: asyncio.Task | None = None
        spec_k = 0
        pipelined = ahead = False
        timing = RoundTiming()
        pending: Delta | None = None  # the last round's tokens, sent once the next verify is under way
        verify: asyncio.Future | None = None
        # first round: prefill with no block; the draft guesses [first token] + block meanwhile
        k = self._choose_k()
        if self.drafts is not None and self.opts.pipeline and k > 0:
            spec = asyncio.ensure_future(self._propose(len(seq.all_ids), [], k, block_len=0))
            spec_k = k
        if governed:
            self.costs.governor.enter()
        try:
            while not seq.finished:
                t_round = time.perf_counter_ns()
                before = len(seq.all_ids)
                verify = asyncio.ensure_future(self._verify(block, q))
                early: int | None = None  # the next round's k, when chosen before this verify
                if spec is None and self.opts.pipeline and self.draft is not None and block:
                    k_next = self.book.choose_ahead_k(self.costs, len(block))
                    if k_next > 0:
                        spec = asyncio.ensure_future(self._propose(before + len(block), [], k_next, block_len=len(block)))
                        spec_k = k_next
                elif spec is None and self.opts.pipeline and self.book.adaptive.enabled and (
                        self.draft is not None or lazy_draft):
                    # no block (adaptive k chose 0): the next k is chosen now, and a probe (or drafting
                    # that pays again) is drafted beside this verify, catching the draft up and guessing
                    # its token, not after it on the round's path: at load, a probe that the others'
                    # step waits for (or that misses it) costs more than plain decoding
                    early = self._choose_k()
                    if early > 0 and self.draft is None and time.monotonic() >= self._draft_retry_at:
                        await self._open_draft()  # opened lazily: it holds every token before this verify
                    if early > 0 and self.draft is not None:
                        valid = self.book.draft_valid
                        spec = asyncio.ensure_future(self._propose(valid, seq.all_ids[valid:], early, block_len=0))
                        spec_k = early
                t0 = time.perf_counter_ns()
                if pending is not None:  # streaming the last round overlaps this round's verify
                    yield pending
                    pending = None
                trace.mark("loop.verify_await", self._round)
                res = await verify
                trace.mark("loop.verdict", self._round)
                t_verify = time.perf_counter_ns() - t0
                timing.verify_wait_ns, timing.verify_ns, timing.verify_queue_ns = t_verify, res.verify_ns, res.queue_ns
                self.stats.verify_ns += t_verify
                a, emitted, lps = res.num_accepted, res.emitted, res.logprobs
                # echo: the first verdict carries the prompt's logprobs
                kept, text = self.book.commit(len(block), a, emitted, lps, res.prompt_logprobs or None)
                if governed:
                    self.costs.governor.record(len(kept))
                self.costs.observe_verify(len(block), t_verify / 1e9, prompt_chunk=res.chunked)
                drafted_block = block
                if seq.finished:
                    timing.round_ns = time.perf_counter_ns() - t_round
                    yield self._delta(kept, text, lps, len(drafted_block), a, pipelined, timing, ahead)
                    break
                # next block: the pipelined guess if it holds, else a fresh proposal
                block, q = [], (None, None)
                t1 = time.perf_counter_ns()
                hit = ahead_next = False
                if spec is not None:
                    prop = await spec
                    spec = None
                    timing.ahead_wait_ns = time.perf_counter_ns() - t1
                    self.costs.observe_ahead_wait(timing.ahead_wait_ns / 1e9)
                    if early is not None and prop is not None:
                        self.book.draft_valid = before  # the probe caught the draft up to this verify
                    ahead_next = prop is not None and bool(prop.branches)  # a block was drafted ahead
                    self.stats.num_drafted_ahead_rounds += int(ahead_next)
                    won = next((b for b in prop.branches or () if (b.accepted, b.token) == (a, emitted[-1])), None) \
                        if prop is not None else None
                    if won is not None:
                        hit = True
                        # drafted before this round's tokens were committed: cut to what is left
                        n = min(spec_k, self.book.room())
                        block = list(won.block.token_ids[:n])
                        q = _rows(won.block, 0, n)
                        self.book.draft_valid = len(seq.all_ids)
                        self._adopt = won.id  # the draft session becomes that branch
                        self.stats.num_pipelined_rounds += 1  # drafted beside the verify: not on the round's path
                if not hit and self.drafts is not None:
                    # chosen before the verify: the verdict's tokens have taken some of the room since
                    k = self._choose_k() if early is None else min(early, self.book.room())
                    if k > 0:
                        valid = self.book.draft_valid
                        catch_up = len(seq.all_ids) - valid
                        t_prop = time.perf_counter_ns()
                        prop = await self._propose(valid, seq.all_ids[valid:], k)
                        if prop is not None:
                            self.book.draft_valid = len(seq.all_ids)
                            block, q = list(prop.token_ids), (prop.q_ids, prop.q_probs)
                            timing.draft_ns, timing.draft_queue_ns = prop.draft_ns, prop.queue_ns
                            timing.draft_handled_ns = prop.handled_ns
                            self.costs.observe_draft_call((time.perf_counter_ns() - t_prop) / 1e9,
                                                          max(1, len(prop.token_ids)), catch_up,
                                                          self.adaptive.k_max, prompt_chunk=prop.prefilling,
                                                          step_seconds=prop.draft_ns / 1e9 if prop.draft_ns else None)
                t_end = time.perf_counter_ns()
                timing.draft_wait_ns = t_end - t1
                timing.round_ns = t_end - t_round
                self.stats.draft_ns += t_end - t1
                self.stats.overhead_ns += max(0, (t_end - t_round) - t_verify - (t_end - t1))
                # sent once the next verify is under way: the caller's streaming is off the round's path
                pending = self._delta(kept, text, lps, len(drafted_block), a, pipelined, timing, ahead)
                trace.mark("loop.round_end", self._round)
                pipelined, ahead, timing = hit, ahead_next, RoundTiming()
        finally:
            if governed:
                self.costs.governor.leave()
            for task in (spec, verify):
                if task is not None and not task.done():
                    task.cancel()

    def _wire_states(self, states: list[bytes]) -> bytes:
        """States held since the last propose, the newest rows that fit one message."""
        data = b"".join(states)
        return tail_rows(data, self.opts.hidden_row_bytes) if self.opts.hidden_row_bytes else data

    async def _verify(self, block: list[int], q: Q) -> Verdict:
        """The target's verdict; an EAGLE loop keeps the states it returned for the next propose."""
        if self._restart_target:
            self._restart_target = False
            await self.target.restart()
        res = await self.target.verify(block, q)
        if self.opts.hidden_layers and self.drafts is not None:
            if res.fresh:  # a (re)prefill: states from position 0, covering every older chunk
                self._states = []
                self._states_epoch += 1
            self._states.append(res.hidden_states)
        return res

    def _delta(self, kept: list[int], text: str, lps: list[dict[int, float]] | None, drafted: int, accepted: int,
               pipelined: bool, timing: RoundTiming, ahead: bool = False) -> Delta:
        self.times.add(timing)
        failure, self._draft_failure = self._draft_failure, ""
        seq = self.seq
        return Delta(seq.index, kept, text, lps[: len(kept)] if lps else None, seq.finish_reason, seq.stop_reason,
                     drafted=drafted, accepted=min(accepted, len(kept)), pipelined=pipelined, timing=timing,
                     draft_failure=failure, drafted_ahead=ahead)


def _rows(prop: Proposal, start: int, stop: int) -> Q:
    """The draft distributions of block tokens start..stop-1 (None, None for greedy)."""
    if prop.q_ids is None or prop.q_probs is None:
        return None, None
    return prop.q_ids[start:stop], prop.q_probs[start:stop]
