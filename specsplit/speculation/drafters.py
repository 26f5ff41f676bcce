"""Drafters: propose blocks of tokens for many sessions at once, behind one interface.

A request says "your sequence is now your own tokens[:prefix_len], followed by
`new_tokens`; propose k tokens". Addressing by absolute length makes rollback after a
rejection, catching up after rounds without drafting, and the pipelined guess of the next
block (prefix = all drafts accepted, no new tokens, k + 1 tokens: the first one is the
guess of the target's bonus token) the same operation: truncate, append, draft. A request
with `branch` set drafts ahead for several outcomes of the block under verify at once, and the
next one names the outcome that happened (`adopt`); see specsplit/speculation/branches.py.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from specsplit import trace
from specsplit.runtime.model import top_candidates
from specsplit.runtime.runner import ModelRunner, StepInput
from specsplit.sampling.history import output_counts, seen_mask
from specsplit.sampling.logits import (
    SamplingBatch,
    make_generator,
    process_logits,
    sample_sparse,
    topk_truncate,
)
from specsplit.sampling.params import SamplingParams
from specsplit.speculation.branches import (
    MAX_BRANCHES,
    Alternatives,
    BranchProposal,
    BranchSpec,
    BranchTree,
)
from specsplit.speculation.session import SessionError, UnknownSession, check_token_ids
from specsplit.speculation.target import default_prefill_chunk, plan_chunks


@dataclass
class DraftRequest:
    seq_id: int
    prefix_len: int  # keep this many of the session's tokens (prompt + earlier drafts)
    new_tokens: list[int]  # then append these committed tokens (often just the target's last one)
    k: int  # tokens to propose
    # EAGLE heads only: [n, D] the target's hidden states that predicted each of the sequence's
    # last n tokens (after this update), as the target's verify step returned them; D is the
    # head's state width (hidden size, x3 for EAGLE-3). None for drafters that do not read them.
    hidden_states: Tensor | None = None
    # draft ahead for the outcomes of verifying the prefix's last block_len tokens: k tokens per
    # branch (the session's own, all-accepted branch drafts k + 1: its first is the bonus guess)
    branch: BranchSpec | None = None
    adopt: int | None = None  # the branch of the last branch request the verify chose; None: none did


@dataclass
class Proposal:
    token_ids: list[int]  # the block, len == k
    q_ids: Tensor | None = None  # [k, K] sparse support the block was sampled from (None: greedy)
    q_probs: Tensor | None = None  # [k, K]
    draft_ns: int = 0  # the batched step(s) that made it
    queue_ns: int = 0  # served: how long the request waited for its batch (as the draft tier reported it)
    prefilling: bool = False  # empty because this step cached a chunk of a long prompt instead
    branches: list[BranchProposal] | None = None  # a branch request's answer (token_ids then empty)
    alts: Alternatives | None = None  # the draft's runner-up candidates per token (when recorded)
    handled_ns: int = 0  # served: the draft tier's whole handling of the request (queue and step included)


@dataclass
class DraftSession:
    seq_id: int
    params: SamplingParams
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)  # prompt + committed + last proposals
    prompt_len: int = 0  # tokens[prompt_len:] were generated (frequency / presence penalties)
    alts: Alternatives | None = None  # candidates at the positions it drafted last (branch guesses)


# Mixed into a request's seed for the draft's RNG. The target seeds its RNG with the request's
# seed too; were both streams the same, the target's acceptance uniforms would be correlated
# with the draft's choices and seeded sampling would no longer follow the target distribution.
# A fixed constant (not hash()) so the draft service and the in-process engine agree.
DRAFT_SEED_SALT = 0x5EED_D4AF_7C3B_91E5


def draft_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The draft's own RNG for a seeded request: reproducible, independent of the target's."""
    if params.seed is None:
        return make_generator(params, device)
    seed = (params.seed ^ DRAFT_SEED_SALT) & (2**63 - 1)
    return torch.Generator(device=device).manual_seed(seed)


def penalty_inputs(batch: SamplingBatch, sessions: list[DraftSession], blocks: list[list[int]], vocab_size: int,
                   device: torch.device) -> tuple[Tensor | None, Tensor | None]:
    """What the penalties of a drafting step need, per row (session + its block so far): the seen
    mask # [n, V] for the repetition penalty, the output counts # [n, V] for presence/frequency."""
    seen = counts = None
    if batch.any_penalty:
        seen = seen_mask([torch.tensor(s.tokens + b) for s, b in zip(sessions, blocks, strict=True)], vocab_size, device)
    if batch.any_output_penalty:  # generated tokens only
        outs = [torch.tensor(s.tokens[s.prompt_len :] + b, dtype=torch.int64) for s, b in zip(sessions, blocks, strict=True)]
        counts = output_counts(outs, vocab_size, device)
    return seen, counts


def _check_branch(spec: BranchSpec, length: int) -> None:
    if not 0 <= spec.block_len < length:
        raise SessionError(f"branch block_len {spec.block_len} outside 0..{length - 1} (the session's tokens)")
    if not 1 <= spec.max_branches <= MAX_BRANCHES:
        raise SessionError(f"max_branches {spec.max_branches} outside 1..{MAX_BRANCHES}")


class Drafter(ABC):
    """Common session bookkeeping; subclasses only say how a batch of blocks is made."""

    method: str = ""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.sessions: dict[int, DraftSession] = {}
        self.tree = BranchTree()
        # runner-up candidates recorded per drafted token (m - 1 of a top-m guess): what branches
        # below full acceptance guess the target's token from; 0 records none (no such branches)
        self.alternatives = 0
        # the most sequences one drafting pass takes, sessions and their branches' forks (a draft
        # tier's max batch): under load the tree narrows instead of multiplying the batch; None: no cap
        self.max_rows: int | None = None

    def open(self, seq_id: int, prompt_ids: list[int], params: SamplingParams, prompt_len: int | None = None) -> None:
        """`prompt_len`: how many of `prompt_ids` are the prompt (a re-opened session also
        carries the tokens generated so far); None: all of them."""
        if seq_id in self.sessions:
            raise SessionError(f"draft session {seq_id} is already open")
        if not prompt_ids:
            raise SessionError("prompt is empty")
        if prompt_len is not None and not 0 < prompt_len <= len(prompt_ids):
            raise SessionError(f"prompt_len {prompt_len} outside 1..{len(prompt_ids)}")
        self._check(prompt_ids, "prompt")
        self._check(list(params.logit_bias or ()), "logit_bias")
        self.sessions[seq_id] = DraftSession(seq_id, params, draft_generator(params, self.device), list(prompt_ids),
                                             len(prompt_ids) if prompt_len is None else prompt_len)
        self._on_open(seq_id)

    def close(self, seq_id: int) -> None:
        if seq_id in self.sessions:
            self.tree.close(self, seq_id)  # its branches' borrowed blocks stay with the session until here
            del self.sessions[seq_id]
            self._on_close(seq_id)

    def propose(self, reqs: list[DraftRequest]) -> list[Proposal]:
        t0 = time.perf_counter_ns()
        for r in reqs:
            s = self.sessions.get(r.seq_id)
            if s is None:
                raise UnknownSession(f"no open draft session {r.seq_id}")
            n = len(self.tree.tokens_after(r.seq_id, r.adopt, s.tokens))
            if not 0 < r.prefix_len <= n:
                raise SessionError(f"draft session {r.seq_id}: prefix_len {r.prefix_len} outside 1..{n}")
            if r.k < 0:
                raise SessionError(f"k must be >= 0, got {r.k}")
            if r.branch is not None:
                _check_branch(r.branch, r.prefix_len + len(r.new_tokens))
            self._check(r.new_tokens, "committed tokens")
        for r in reqs:
            self.tree.settle(self, r.seq_id, r.adopt)
            s = self.sessions[r.seq_id]
            del s.tokens[r.prefix_len :]
            s.tokens.extend(r.new_tokens)
            # tokens past prefix_len may have changed; the last token must be fed again
            self._rollback(r.seq_id, min(r.prefix_len, len(s.tokens) - 1))
        # a branch request's session drafts its all-accepted branch: the bonus guess + k
        own = [r if r.branch is None else replace(r, k=r.k + 1) for r in reqs if r.k > 0]
        free = self._free_blocks(own)
        forks = self.tree.plan(self, [r for r in reqs if r.branch is not None and r.k > 0], free,
                               None if self.max_rows is None else self.max_rows - len(own))
        active = own + forks  # one batched pass for sessions and branches alike
        trace.mark("draft.planned", len(active))
        made = dict(zip([r.seq_id for r in active], self._draft(active), strict=True)) if active else {}
        dt = time.perf_counter_ns() - t0
        for r in active:
            s, p = self._session(r.seq_id), made[r.seq_id]
            s.alts = p.alts
            if p.alts is not None:
                p.alts.start = len(s.tokens)
            s.tokens.extend(p.token_ids)
        out = []
        for r in reqs:
            p = made.get(r.seq_id, Proposal([]))
            if r.branch is not None:
                p = self.tree.collect(self, r, p, made)
            p.draft_ns = dt
            out.append(p)
        return out

    def _session(self, seq_id: int) -> DraftSession:
        """A session, or a branch forked from one (drafted like a session)."""
        s = self.sessions.get(seq_id)
        return s if s is not None else self.tree.children[seq_id]

    # ---- forks: drafters with a KV cache override these (the others draft no forked branches) ----
    def _kv_length(self, seq_id: int) -> int:
        return 0

    def _free_blocks(self, reqs: list[DraftRequest]) -> int | None:
        """KV blocks left to branches once `reqs` have drafted; None: no KV cache."""
        return None

    def _fork_blocks(self, shared: int, final_len: int) -> int:
        return 0

    def _fork(self, forks: list[tuple[int, int, int]]) -> list[int]:
        return []

    def _adopt_fork(self, seq_id: int, child: int) -> None:  # noqa: B027 - optional hook
        pass

    def _free_fork(self, child: int) -> None:  # noqa: B027 - optional hook
        pass

    def _check(self, ids: list[int], what: str) -> None:
        check_token_ids(ids, self.vocab_size, what)

    def _on_open(self, seq_id: int) -> None:  # noqa: B027 - optional hook
        pass

    def _on_close(self, seq_id: int) -> None:  # noqa: B027 - optional hook
        pass

    def _rollback(self, seq_id: int, valid: int) -> None:  # noqa: B027 - optional hook
        """Only the first `valid` tokens of any cached state still hold; drop the rest."""

    @abstractmethod
    def _draft(self, reqs: list[DraftRequest]) -> list[Proposal]:
        """Make one block per request from `self.sessions[r.seq_id].tokens` (already updated)."""


class NgramDrafter(Drafter):
    """Prompt lookup: continue the most recent earlier occurrence of the history's tail.

    Proposals are deterministic, so the sparse q is one-hot (K = 1, probability 1): the
    target's rejection sampling stays exact for sampled requests too.
    """

    method = "ngram"

    def __init__(self, vocab_size: int, device: torch.device, min_n: int = 1, max_n: int = 4) -> None:
        super().__init__(vocab_size, device)
        self.min_n, self.max_n = min_n, max_n

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        n_tokens = len(tokens)
        for n in range(min(self.max_n, n_tokens - 1), self.min_n - 1, -1):
            tail = tokens[n_tokens - n :]
            # search backwards from the latest earlier start
            for start in range(n_tokens - n - 1, -1, -1):
                if tokens[start : start + n] == tail:
                    return tokens[start + n : start + n + k]
        return []

    def _draft(self, reqs: list[DraftRequest]) -> list[Proposal]:
        out = []
        for r in reqs:
            s = self.sessions[r.seq_id]
            ids = self.lookup(s.tokens, r.k)
            if s.params.greedy or not ids:
                out.append(Proposal(ids))
            else:
                t = torch.tensor(ids, dtype=torch.int64)[:, None]
                out.append(Proposal(ids, t, torch.ones(len(ids), 1)))
        return out


class DraftModelDrafter(Drafter):
    """A small causal LM with its own paged cache, drafting a whole batch per forward.

    Chunked prefill as the target's (target.py): a session with more than the step's share of
    `prefill_chunk` tokens still to cache gets a chunk of them and an empty proposal (which the
    caller verifies as a plain round), so no step is unbounded.

    Subclasses change which token is chosen at each step (`_choose`, `_ranked`) without
    copying the loop: the benchmarks' oracle proposes known answers through the same passes.
    """

    method = "draft_model"

    def __init__(self, runner: ModelRunner, top_k: int = 32, prefill_chunk: int | None = None) -> None:
        super().__init__(runner.cfg.vocab_size, runner.device)
        self.runner = runner
        self.top_k = top_k
        self.prefill_chunk = prefill_chunk or default_prefill_chunk(runner.device)

    def _on_open(self, seq_id: int) -> None:
        self.runner.add(seq_id)

    def _on_close(self, seq_id: int) -> None:
        self.runner.free(seq_id)

    def _rollback(self, seq_id: int, valid: int) -> None:
        if self.runner.length(seq_id) > valid:
            self.runner.truncate(seq_id, valid)

    # ---- forks (branches) --------------------------------------------------------------------
    def _kv_length(self, seq_id: int) -> int:
        return self.runner.length(seq_id)

    def _free_blocks(self, reqs: list[DraftRequest]) -> int | None:
        cache = self.runner.cache  # questions only: changes go through the runner (mirrored over TP ranks)
        need = sum(cache.blocks_needed(r.seq_id, len(self._session(r.seq_id).tokens) + r.k - 1) for r in reqs)
        if need > cache.num_free_blocks:  # branches are guesses: they give way before any session does
            self.tree.reclaim(self, {r.seq_id for r in reqs})
        return cache.num_free_blocks - need

    def _fork_blocks(self, shared: int, final_len: int) -> int:
        bs = self.runner.cache.block_size
        return -(-final_len // bs) - shared // bs

    def _fork(self, forks: list[tuple[int, int, int]]) -> list[int]:
        return self.runner.fork(forks) if forks else []

    def _adopt_fork(self, seq_id: int, child: int) -> None:
        self.runner.free(seq_id)
        self.runner.rename(child, seq_id)

    def _free_fork(self, child: int) -> None:
        self.runner.free(child)

    # ---- drafting ----------------------------------------------------------------------------
    def _choose(self, logits: Tensor, batch: SamplingBatch, rows: Tensor | None,
                step: int) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """The token of each live row at block position `step` (# [m]), and the sparse q it was
        sampled from (ids, probs # [m, K]; None: all greedy). `rows` # [m]: the live rows of the
        batch (None: all)."""
        if batch.all_greedy and batch.bias_rows is None:
            return logits.argmax(-1), None  # the argmax of the processed distribution too
        ids, p = topk_truncate(process_logits(logits, batch), self.top_k)  # [m, K]
        return sample_sparse(ids, p, batch), (ids, p)

    def _candidates(self, logits: Tensor, q: tuple[Tensor, Tensor] | None, chosen: Tensor, rows: Tensor | None,
                    step: int, m: int) -> tuple[Tensor, Tensor, Tensor]:
        """The m most likely tokens of each live row (ids, probs # [rows, m]) and the chosen token's
        probability # [rows]: what the tree of guesses ranks and guesses from."""
        if q is None:
            return self._ranked(*top_candidates(logits, m), chosen, rows, step)  # [rows, m] each
        ids, p = q
        return ids[:, :m], p[:, :m], (p * (ids == chosen[:, None])).sum(-1)

    def _ranked(self, ids: Tensor, probs: Tensor, chosen: Tensor, rows: Tensor | None,
                step: int) -> tuple[Tensor, Tensor, Tensor]:
        """A greedy step's candidates as the tree sees them, from the model's top-m (ids, probs
        # [rows, m]); also applied to the top-m a chained block returns. Drafters that steer
        their choice (the benchmarks' oracle) override it."""
        return ids, probs, probs[:, 0]

    def _draft(self, reqs: list[DraftRequest]) -> list[Proposal]:
        uncached = [len(self._session(r.seq_id).tokens) - self.runner.length(r.seq_id) for r in reqs]
        chunks = plan_chunks(uncached, uncached, self.prefill_chunk)
        cut = [StepInput(r.seq_id, self._uncached(r.seq_id)[:n]) for r, n in zip(reqs, chunks, strict=True) if n]
        if cut:
            self.runner.forward(cut)  # prefill only: the logits are not used
        whole = [r for r, n in zip(reqs, chunks, strict=True) if n is None]
        made = dict(zip([r.seq_id for r in whole], self._draft_blocks(whole), strict=True)) if whole else {}
        return [made.get(r.seq_id, Proposal([], prefilling=True)) for r in reqs]

    def _uncached(self, seq_id: int) -> list[int]:
        return self._session(seq_id).tokens[self.runner.length(seq_id) :]

    def _draft_blocks(self, reqs: list[DraftRequest]) -> list[Proposal]:
        """Draft k tokens for each request, whose uncached tokens fit one step."""
        sessions = [self._session(r.seq_id) for r in reqs]
        batch = SamplingBatch.from_params([s.params for s in sessions], self.device, [s.generator for s in sessions])
        if batch.any_penalty or batch.any_output_penalty:
            return self._draft_with_penalty(reqs, sessions, batch)
        # every token stays on the device until the block is done: the chosen tokens are fed
        # straight back (ModelRunner.forward's device_ids), one host copy per block, not per token
        n, kmax = len(reqs), max(r.k for r in reqs)
        m = min(self.alternatives + 1, self.top_k, self.vocab_size) if self.alternatives > 0 else 0
        plan = self._planned(reqs, sessions, kmax)  # [n, kmax] or None
        toks = torch.zeros(n, kmax, dtype=torch.int64, device=self.device)  # [n, kmax]
        cand_ids = torch.zeros(n, kmax, m, dtype=torch.int64, device=self.device)  # [n, kmax, m]
        cand_p = torch.zeros(n, kmax, m, device=self.device)  # [n, kmax, m]
        chosen_p = torch.zeros(n, kmax, device=self.device)  # [n, kmax]
        sparse: list[tuple[Tensor, Tensor, list[int]]] = []  # per step: ids [m, K], probs [m, K], rows
        inputs = [StepInput(r.seq_id, s.tokens[self.runner.length(r.seq_id) :]) for r, s in zip(reqs, sessions, strict=True)]
        live = list(range(n))
        fed: Tensor | None = None
        for j in range(kmax):
            logits = self.runner.forward([inputs[i] for i in live], fed)  # [len(live), V]
            rows = torch.tensor(live, device=self.device) if len(live) < n else None
            sub = batch.select(rows) if rows is not None else batch
            step, q = self._choose(logits, sub, rows, j)  # [m]
            if plan is not None and q is None:  # planned tokens replace greedy picks (as in the chain below)
                want = plan[:, j] if rows is None else plan[rows, j]
                step = torch.where(want >= 0, want, step)
            if q is not None:
                sparse.append((q[0], q[1], live))
            at = slice(None) if rows is None else rows
            toks[at, j] = step
            if m:
                cand_ids[at, j], cand_p[at, j], chosen_p[at, j] = self._candidates(logits, q, step, rows, j, m)
            keep = [x for x, i in enumerate(live) if reqs[i].k > j + 1]
            live = [live[x] for x in keep]
            if not live:
                break
            fed = step if len(keep) == len(step) else step[torch.tensor(keep, device=self.device)]
            if j == 0 and len(live) == n and batch.all_greedy and batch.bias_rows is None \
                    and all(r.k == kmax for r in reqs) \
                    and (plan is not None or type(self)._choose is DraftModelDrafter._choose):
                # the rest of the block in one CUDA graph replay, with each step's top-m for the
                # tree of guesses (None: no graphs here, step on)
                rest = self.runner.forward_chain([r.seq_id for r in reqs], fed, kmax - 1,
                                                 None if plan is None else plan[:, 1:], top=m) \
                    if hasattr(self.runner, "forward_chain") else None
                if rest is not None:
                    if m:
                        rest, ids_rest, p_rest = rest
                        for i in range(1, kmax):
                            cand_ids[:, i], cand_p[:, i], chosen_p[:, i] = self._ranked(
                                ids_rest[:, i - 1], p_rest[:, i - 1], rest[:, i - 1], None, i)
                    toks[:, 1:] = rest
                    break
            for i in live:
                inputs[i] = StepInput(reqs[i].seq_id, [0])  # placeholder: the id comes from `fed`
        blocks = toks.tolist()
        alts = (cand_ids.tolist(), cand_p.tolist(), chosen_p.tolist()) if m else None
        out = []
        for i, (r, s) in enumerate(zip(reqs, sessions, strict=True)):
            p = Proposal(blocks[i][: r.k])
            if not s.params.greedy:
                p.q_ids = torch.stack([ids[rows.index(i)] for ids, _, rows in sparse[: r.k]])
                p.q_probs = torch.stack([q[rows.index(i)] for _, q, rows in sparse[: r.k]])
            if alts is not None:
                p.alts = Alternatives(0, p.token_ids, alts[2][i][: r.k], alts[0][i][: r.k], alts[1][i][: r.k])
            out.append(p)
        return out

    def _planned(self, reqs: list[DraftRequest], sessions: list[DraftSession], kmax: int) -> Tensor | None:
        """What a `_choose` override picks, known before the block: tokens # [n, kmax] instead of the
        model's greedy choice, -1 = the model's; None: none. With it a greedy block still runs as one
        CUDA graph (`ModelRunner.forward_chain`); the benchmarks' oracle drafter gives its plan here."""
        return None

    def _draft_with_penalty(self, reqs: list[DraftRequest], sessions: list[DraftSession],
                            batch: SamplingBatch) -> list[Proposal]:
        """The repetition penalty needs each token on the host to update what was seen."""
        m = min(self.alternatives + 1, self.top_k, self.vocab_size) if self.alternatives > 0 else 0
        blocks: list[list[int]] = [[] for _ in reqs]
        q_ids: list[list[Tensor]] = [[] for _ in reqs]
        q_probs: list[list[Tensor]] = [[] for _ in reqs]
        cands: list[list[tuple[list[int], list[float], float]]] = [[] for _ in reqs]
        # first forward feeds everything not yet cached; later ones one token each
        inputs = [StepInput(r.seq_id, s.tokens[self.runner.length(r.seq_id) :]) for r, s in zip(reqs, sessions, strict=True)]
        live = list(range(len(reqs)))
        for _ in range(max(r.k for r in reqs)):
            logits = self.runner.forward([inputs[i] for i in live])  # [len(live), V]
            sub = batch.select(torch.tensor(live, device=self.device)) if len(live) < len(reqs) else batch
            seen, counts = penalty_inputs(sub, [sessions[i] for i in live], [blocks[i] for i in live], self.vocab_size,
                                          self.device)
            probs = process_logits(logits, sub, seen, counts)  # [n, V]
            if sub.all_greedy:
                step = probs.argmax(-1)  # [n]
            else:
                ids, p = topk_truncate(probs, self.top_k)  # [n, K]
                step = sample_sparse(ids, p, sub)
            toks = step.tolist()
            if m:
                cp, ci = probs.float().topk(m, dim=-1)  # [n, m]
                chosen = probs.float().gather(1, step[:, None])[:, 0].tolist()
                for j, i in enumerate(live):
                    cands[i].append((ci[j].tolist(), cp[j].tolist(), chosen[j]))
            for j, i in enumerate(live):
                blocks[i].append(toks[j])
                if not sub.all_greedy and not sessions[i].params.greedy:
                    q_ids[i].append(ids[j])
                    q_probs[i].append(p[j])
            live = [i for i in live if len(blocks[i]) < reqs[i].k]
            if not live:
                break
            for i in live:
                inputs[i] = StepInput(reqs[i].seq_id, [blocks[i][-1]])
        out = []
        for i, s in enumerate(sessions):
            p = Proposal(blocks[i]) if s.params.greedy else \
                Proposal(blocks[i], torch.stack(q_ids[i]), torch.stack(q_probs[i]))
            if m:
                p.alts = Alternatives(0, blocks[i], [c[2] for c in cands[i]], [c[0] for c in cands[i]],
                                      [c[1] for c in cands[i]])
            out.append(p)
        return out
