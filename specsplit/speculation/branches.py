"""The tree of guesses: drafting ahead for the likely outcomes of a verify (docs/architecture.md).

While the target verifies a block d_1..d_L, the draft prepares the next block for the outcomes
it finds most likely. An outcome is "the target accepts j of the L tokens, then its own token is
c". For j = L, c is the draft's own next token (its guess of the bonus token); the session itself
drafts that branch, as the single pipelined guess always did. For j < L the target rejected
d_{j+1}, so c is one of the draft's runner-up candidates at that position (top-2, or top-m).
Each such branch is a forked sequence: it borrows the session's KV blocks up to its fork point
(`PagedKVCache.fork`) and drafts after prefix + d_1..d_j + c. All branches of all sessions are
drafted in the same batched forward passes.

The next request of the session names the branch the verify chose (`adopt`), or none: the
winner's tokens and KV become the session's (no recompute) and every other branch is freed. A
branch whose KV was given up under memory pressure can still be adopted: its tokens are known,
so the session's KV is cut back to the fork point and the rest is drafted again.

For a sampled session, a branch's block is drawn from the draft's own distributions given the
branch's prefix, and its q rows are those distributions, so the target's rejection sampling of
that block stays exact whichever branch wins.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from specsplit.speculation.session import SessionError

if TYPE_CHECKING:
    from specsplit.speculation.drafters import Drafter, DraftRequest, DraftSession, Proposal

MAX_BRANCHES = 64  # per request: a tree wider than this costs more than it could ever win


def check_max_branches(n: int) -> int:
    """A configured tree width (`--max-branches`): 0 means every outcome the draft guesses (at most
    MAX_BRANCHES); anything outside 0..MAX_BRANCHES is refused where it is configured, at start."""
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_BRANCHES:
        raise ValueError(f"max_branches must be an integer in 0..{MAX_BRANCHES} (0: every outcome the draft "
                         f"guesses; 1: only the all-accepted guess), got {n!r}")
    return n


MAX_ALTERNATIVES = 8  # runner-up candidates per drafted token: more rows per pass than a round can win back


def check_branch_alternatives(n: int | None) -> int | None:
    """A configured `--branch-alternatives` (None: the draft tier's per-device default), refused
    at start outside 0..MAX_ALTERNATIVES."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_ALTERNATIVES):
        raise ValueError(f"branch_alternatives must be an integer in 0..{MAX_ALTERNATIVES} (0: only the "
                         f"all-accepted guess), got {n!r}")
    return n


@dataclass(frozen=True)
class BranchSpec:
    """Guess the outcomes of the session's last `block_len` tokens (the block under verify)."""

    block_len: int  # the block just proposed: the last block_len tokens of the prefix
    max_branches: int  # at most this many outcomes: the all-accepted one and the likeliest others


@dataclass
class Alternatives:
    """The draft's candidates at each position of its last drafted run (host copies)."""

    start: int  # absolute position of the first drafted token
    tokens: list[int]  # what was drafted, one per position
    chosen_p: list[float]  # the draft's probability of each drafted token
    cand_ids: list[list[int]]  # per position, the m most likely tokens, most likely first
    cand_p: list[list[float]]  # their probabilities

    def at(self, pos: int, token: int) -> tuple[float, list[tuple[int, float]]] | None:
        """(p of the drafted token, the runner-up candidates) at absolute `pos`, if `token` was drafted there."""
        i = pos - self.start
        if not 0 <= i < len(self.tokens) or self.tokens[i] != token:
            return None
        others = [(t, p) for t, p in zip(self.cand_ids[i], self.cand_p[i], strict=True) if t != token]
        return self.chosen_p[i], others


@dataclass
class Branch:
    id: int
    accepted: int  # j: how many of the block's tokens this outcome accepts
    token: int  # c: the target's token this outcome assumes (-1 until drafted, for j = L)
    fork_len: int  # the branch's tokens share this many with the session's
    seq_id: int | None  # the forked sequence holding its tokens and KV; None: the session's own
    session: DraftSession | None = None  # the fork's own tokens (and alternatives)


@dataclass
class BranchProposal:
    """One branch's answer: the outcome it assumed and the block drafted after it."""

    id: int
    accepted: int
    token: int
    block: Proposal  # k ids (+ q rows when sampling)


def outcomes(tokens: list[int], alts: Alternatives | None, block_len: int, max_branches: int
             ) -> list[tuple[float, int, int]]:
    """The most likely outcomes of verifying tokens[-block_len:], as (draft probability, j, c).

    j = block_len (all accepted; c is drafted later, -1 here) is always among them; j < block_len
    needs the draft's runner-up candidates at position j + 1 of the block. The probability is the
    draft's: prod_{i <= j} p(d_i) * p(c) (times nothing for j = block_len), most likely first.
    """
    start = len(tokens) - block_len
    out: list[tuple[float, int, int]] = []
    reach = 1.0  # the draft's probability that d_1..d_j are all accepted
    for j in range(block_len):
        got = alts.at(start + j, tokens[start + j]) if alts is not None else None
        if got is None:  # not drafted here (or by another replica): no guess below full acceptance
            reach = 0.0
            break
        p_chosen, others = got
        out.extend((reach * p, j, c) for c, p in others)
        reach *= p_chosen
    out.sort(key=lambda o: -o[0])
    # the all-accepted guess is always kept: the session drafts it itself, without a fork
    return sorted([(reach if reach > 0 else 1.0, block_len, -1), *out[: max_branches - 1]], key=lambda o: -o[0])


@dataclass
class _Table:
    branches: dict[int, Branch] = field(default_factory=dict)


class BranchTree:
    """Every session's live branches, and the forked sequences that hold them."""

    def __init__(self) -> None:
        self.tables: dict[int, _Table] = {}
        self.children: dict[int, DraftSession] = {}  # forked seq id -> its session (for drafting)
        # the branch each session adopted last: a step retried after running out of KV memory
        # (serving.kv.preempting) repeats its requests, adopt included, and must find it settled
        self.adopted: dict[int, int] = {}
        self._ids = itertools.count(1)
        self._child_ids = itertools.count(1 << 40)  # never a session id
        self.stats = {"requested": 0, "drafted": 0, "adopted": 0, "kv_dropped": 0}

    def live(self, seq_id: int) -> int:
        t = self.tables.get(seq_id)
        return len(t.branches) if t is not None else 0

    def tokens_after(self, seq_id: int, adopt: int | None, tokens: list[int]) -> list[int]:
        """The session's tokens once `adopt` is settled; SessionError for a branch it does not have."""
        if adopt is None or adopt == self.adopted.get(seq_id):
            return tokens
        t = self.tables.get(seq_id)
        b = t.branches.get(adopt) if t is not None else None
        if b is None:
            raise SessionError(f"draft session {seq_id} has no branch {adopt} (live: "
                               f"{sorted(t.branches) if t is not None else []})")
        return b.session.tokens if b.session is not None else tokens

    def settle(self, d: Drafter, seq_id: int, adopt: int | None) -> None:
        """The verify chose `adopt` (or no branch): it becomes the session, the rest is freed."""
        t = self.tables.pop(seq_id, None)
        if t is None:
            return
        s = d.sessions[seq_id]
        for b in t.branches.values():
            if b.id == adopt:
                self.stats["adopted"] += 1
                self.adopted[seq_id] = adopt
            if b.id == adopt and b.session is not None:  # the session's own branch is already the session
                s.tokens, s.alts = b.session.tokens, b.session.alts
                if b.seq_id is not None and b.seq_id in self.children:
                    d._adopt_fork(seq_id, b.seq_id)
                else:  # its KV was given up: keep what the fork shared, redraft the rest
                    d._rollback(seq_id, min(b.fork_len, len(s.tokens) - 1))
            if b.seq_id is not None:
                self._free_child(d, b.seq_id)

    def close(self, d: Drafter, seq_id: int) -> None:
        self.adopted.pop(seq_id, None)
        t = self.tables.pop(seq_id, None)
        for b in t.branches.values() if t is not None else ():
            if b.seq_id is not None:
                self._free_child(d, b.seq_id)

    def reclaim(self, d: Drafter, keep: set[int]) -> int:
        """Give up the KV of every branch not of a session in `keep` (their records stay); returns how many."""
        n = 0
        for seq_id, t in self.tables.items():
            if seq_id in keep:
                continue
            for b in t.branches.values():
                if b.seq_id is not None and b.seq_id in self.children:
                    self._free_child(d, b.seq_id)
                    n += 1
        self.stats["kv_dropped"] += n
        return n

    def _free_child(self, d: Drafter, child: int) -> None:
        if self.children.pop(child, None) is not None:
            d._free_fork(child)

    def plan(self, d: Drafter, reqs: list[DraftRequest], free_blocks: int | None,
             max_forks: int | None = None) -> list[DraftRequest]:
        """Fork the branches of every branch request and return the forks' drafting requests;
        each session drafts its own j = L branch. At most `max_forks` forks in all (the pass's
        rows beyond the sessions' own), and as KV allows: the outcomes the draft finds most
        likely across all sessions first, so under load the tree narrows to its best guesses
        instead of multiplying the draft's batch."""
        from specsplit.speculation.drafters import DraftRequest, DraftSession

        wanted: list[tuple[float, int, DraftRequest, int, int]] = []  # (p, order, request, j, c)
        for r in reqs:
            assert r.branch is not None
            s = d.sessions[r.seq_id]
            t = self.tables.setdefault(r.seq_id, _Table())
            self.stats["requested"] += 1
            for p, j, c in outcomes(s.tokens, s.alts, r.branch.block_len, r.branch.max_branches):
                if j == r.branch.block_len:
                    b = Branch(next(self._ids), j, -1, len(s.tokens), None)
                    t.branches[b.id] = b
                else:
                    wanted.append((p, len(wanted), r, j, c))
        wanted.sort(key=lambda w: (-w[0], w[1]))
        if max_forks is not None:
            del wanted[max(0, max_forks):]
        forks: list[tuple[int, int, int]] = []
        pending: list[tuple[int, Branch, DraftSession, int]] = []
        for _, _, r, j, c in wanted:
            s = d.sessions[r.seq_id]
            fork_len = len(s.tokens) - r.branch.block_len + j  # type: ignore[union-attr]
            child = next(self._child_ids)
            cs = DraftSession(child, s.params, s.generator, s.tokens[:fork_len] + [c], s.prompt_len)
            b = Branch(next(self._ids), j, c, fork_len, child, cs)
            shared = min(d._kv_length(r.seq_id), fork_len)
            need = d._fork_blocks(shared, len(cs.tokens) + r.k - 1)
            if free_blocks is not None:
                if need > free_blocks:
                    continue  # degrade: fewer branches, never a failed step
                free_blocks -= need
            forks.append((r.seq_id, child, shared))
            pending.append((r.k, b, cs, r.seq_id))
        made = set(d._fork(forks))
        out = []
        for k, b, cs, seq_id in pending:
            if b.seq_id not in made:
                continue
            self.children[cs.seq_id] = cs
            self.tables[seq_id].branches[b.id] = b
            out.append(DraftRequest(cs.seq_id, len(cs.tokens), [], k))
        self.stats["drafted"] += len(out)
        return out

    def collect(self, d: Drafter, r: DraftRequest, own: Proposal, made: dict[int, Proposal]) -> Proposal:
        """The branch request's answer: every branch that drafted, the session's own first."""
        from specsplit.speculation.drafters import Proposal

        t = self.tables.get(r.seq_id)
        out: list[BranchProposal] = []
        for b in list(t.branches.values()) if t is not None else []:
            if b.seq_id is None:
                if not own.token_ids:  # nothing drafted (k = 0, or an n-gram miss): no guess
                    del t.branches[b.id]  # type: ignore[union-attr]
                    continue
                b.token = own.token_ids[0]
                block = _cut(own, 1)
            else:
                block = made.get(b.seq_id, Proposal([]))
            out.append(BranchProposal(b.id, b.accepted, b.token, block))
        out.sort(key=lambda p: p.accepted, reverse=True)
        return Proposal([], branches=out)


def _cut(p: Proposal, start: int) -> Proposal:
    """The proposal without its first `start` tokens (and q rows)."""
    from specsplit.speculation.drafters import Proposal

    if p.q_ids is None or p.q_probs is None:
        return Proposal(p.token_ids[start:])
    return Proposal(p.token_ids[start:], p.q_ids[start:], p.q_probs[start:])
