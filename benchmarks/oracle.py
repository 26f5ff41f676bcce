"""Benchmark-only: a drafter whose acceptance rate is set on purpose, and a target it can know.

No real large checkpoint reaches the GPU machines, so the GPU benchmarks run models with the
real shapes and random weights, whose drafts the target would never accept. The oracle drafter
runs the real draft model forward for every token it proposes (so its cost is the real one),
but proposes the target's own greedy continuation, known in advance, with each position replaced
by a wrong token with probability 1 - alpha. Whether a position is right is drawn once per
(reference, position) from the seed, so proposing a position again (after a rejection, or when a
pipelined guess is thrown away) gives the same token, as a deterministic greedy draft would, and
runs with and without pipelining see the same acceptance pattern.

Beta models the draft's runner-up, which the tree of guesses branches on (docs/architecture.md):
where the oracle's top-1 is wrong, its top-2 is the target's token with probability beta (a
second draw per position), else another wrong token; where the top-1 is right, the top-2 is
wrong. The ranks it reports are alpha for its top-1 and (1 - alpha) * beta for its top-2. Real
pairs have a beta of their own (benchmarks/measure_beta.py); beta = 0 is a draft whose runner-up
never helps, where the tree is no better than the single all-accepted guess.

The oracle drafts through DraftModelDrafter's own loop (the same forwards, the same device-side
feeding of each token, the same branches), overriding only which token is chosen at each step.

`confident_random_model` builds the target for it: random weights with the real shapes, except
that the LM head is a permutation of the embedding, so the greedy next token is perm[current
token] by a wide margin. A purely random bf16 model has next-token logits so flat that the
rounding differences between a 1-token step and a 6-token verify flip its greedy choice every few
dozen tokens; the output of plain and speculative decoding then differ for numerical reasons
alone, and the oracle's references stop matching. The timing of a forward pass does not depend
on the weights' values.

Never serve with these: the oracle knows the answers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from specsplit.runtime.runner import ModelRunner
from specsplit.sampling.logits import SamplingBatch
from specsplit.speculation.drafters import DraftModelDrafter, DraftRequest, Proposal
from specsplit.speculation.session import SessionError


@dataclass
class OracleStats:
    proposed: int = 0  # tokens proposed at a position its reference covers
    wrong: int = 0  # of those, replaced by a wrong token on purpose
    unknown: int = 0  # tokens with no reference (no match, off it, past its end): the model's own guess
    off_reference: int = 0  # requests whose prefix left the reference (a wrong guess built on, or divergence)


class OracleDrafter(DraftModelDrafter):
    """Proposes references' tokens, each right with probability alpha; runs the model for the cost."""

    method = "oracle"

    def __init__(self, runner: ModelRunner, alpha: float = 1.0, seed: int = 0, beta: float = 0.0) -> None:
        super().__init__(runner)
        self.seed = seed
        self.alpha = 1.0
        self.beta = 0.0
        self.set_alpha(alpha)
        self.set_beta(beta)
        self.refs: list[list[int]] = []  # prompt + the target's greedy continuation
        self._by_prompt: dict[tuple[int, ...], int] = {}
        self._u: list[np.ndarray] = []  # [len(ref)] one uniform draw per position
        self._u2: list[np.ndarray] = []  # [len(ref)] the draw that decides the top-2 (beta)
        self._wrong: list[list[int]] = []  # [len(ref)] the wrong token used at each position
        self._wrong2: list[list[int]] = []  # [len(ref)] another wrong token (a top-2 that misses)
        self._steer: tuple[torch.Tensor, torch.Tensor] | None = None  # the batch being drafted: plan, top-2
        self._ref_of: dict[int, int] = {}  # seq_id -> reference index
        self._checked: dict[int, int] = {}  # seq_id -> leading tokens known to follow the reference
        self.stats = OracleStats()

    def set_alpha(self, alpha: float) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha = float(alpha)

    def set_beta(self, beta: float) -> None:
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        self.beta = float(beta)

    def set_references(self, refs: Iterable[tuple[Sequence[int], Sequence[int]]]) -> None:
        """(prompt, greedy continuation) pairs; sessions are matched to them by their prompt."""
        self.refs, self._by_prompt, self._u, self._u2, self._wrong, self._wrong2 = [], {}, [], [], [], []
        v = self.vocab_size
        for i, (prompt, cont) in enumerate(refs):
            full = [int(t) for t in prompt] + [int(t) for t in cont]
            self._check(full, "reference")
            rng = np.random.default_rng([self.seed, i])
            self._u.append(rng.random(len(full)))
            # shifts in 1..v-2: t + shift and t + shift + 1 are two tokens, neither of them t
            shift = rng.integers(1, v - 1, len(full)) if v > 2 else np.zeros(len(full), dtype=np.int64)
            self._wrong.append(((np.asarray(full) + shift) % max(v, 1)).tolist())  # never the right token
            self._wrong2.append(((np.asarray(full) + shift + 1) % max(v, 1)).tolist())
            self._u2.append(np.random.default_rng([self.seed, i, 2]).random(len(full)))
            self._by_prompt[tuple(int(t) for t in prompt)] = i
            self.refs.append(full)

    def oracle_top2(self, ref: int, start: int, k: int) -> list[int | None]:
        """The runner-up at positions start..start+k-1: the right token with probability beta
        where the top-1 is wrong, a wrong one otherwise (None: past the reference's end)."""
        full, u, u2 = self.refs[ref], self._u[ref], self._u2[ref]
        wrong, wrong2 = self._wrong[ref], self._wrong2[ref]
        out: list[int | None] = []
        for p in range(start, start + k):
            if p >= len(full):
                out.append(None)
            elif u[p] < self.alpha:
                out.append(wrong[p])
            else:
                out.append(full[p] if u2[p] < self.beta else wrong2[p])
        return out

    def oracle_block(self, ref: int, start: int, k: int) -> list[int | None]:
        """What to propose at positions start..start+k-1 of reference `ref` (None: past its end)."""
        full, u, wrong = self.refs[ref], self._u[ref], self._wrong[ref]
        out: list[int | None] = []
        for p in range(start, start + k):
            if p >= len(full):
                out.append(None)
            else:
                out.append(full[p] if u[p] < self.alpha else wrong[p])
        return out

    # ---- session hooks -------------------------------------------------------------------------
    def _on_open(self, seq_id: int) -> None:
        refuse_sampled(self, seq_id)
        super()._on_open(seq_id)
        follow_reference(self, seq_id)

    def _on_close(self, seq_id: int) -> None:
        super()._on_close(seq_id)
        self._ref_of.pop(seq_id, None)
        self._checked.pop(seq_id, None)

    def _rollback(self, seq_id: int, valid: int) -> None:
        super()._rollback(seq_id, valid)
        if seq_id in self._checked:
            self._checked[seq_id] = min(self._checked[seq_id], valid)

    # a branch follows its session's reference as far as its own tokens do
    def _fork(self, forks: list[tuple[int, int, int]]) -> list[int]:
        made = super()._fork(forks)
        parent_of = {child: (parent, shared) for parent, child, shared in forks}
        for child in made:
            parent, shared = parent_of[child]
            if parent in self._ref_of:
                self._ref_of[child] = self._ref_of[parent]
                self._checked[child] = min(self._checked[parent], shared)
        return made

    def _adopt_fork(self, seq_id: int, child: int) -> None:
        super()._adopt_fork(seq_id, child)
        self._ref_of.pop(child, None)
        if child in self._checked:
            self._checked[seq_id] = self._checked.pop(child)

    def _free_fork(self, child: int) -> None:
        super()._free_fork(child)
        self._ref_of.pop(child, None)
        self._checked.pop(child, None)

    def _plan(self, seq_id: int, tokens: list[int], k: int) -> tuple[list[int | None], list[int | None]]:
        """The block to propose and its runner-ups, or Nones where the draft model's own token goes.

        A prefix off the reference gets the model's tokens: a pipelined guess built on a block
        with a wrong token (which the gateway throws away), or a real divergence.
        """
        ref = self._ref_of.get(seq_id)
        if ref is not None:
            full, c, n = self.refs[ref], self._checked[seq_id], len(tokens)
            if n <= len(full) and tokens[c:n] == full[c:n]:
                self._checked[seq_id] = n
            else:
                self.stats.off_reference += 1
                ref = None
        if ref is None:
            plan: list[int | None] = [None] * k
            top2: list[int | None] = [None] * k
        else:
            plan, top2 = self.oracle_block(ref, len(tokens), k), self.oracle_top2(ref, len(tokens), k)
        known = sum(t is not None for t in plan)
        self.stats.unknown += k - known
        self.stats.proposed += known
        if ref is not None:
            self.stats.wrong += sum(t is not None and t != self.refs[ref][len(tokens) + j] for j, t in enumerate(plan))
        return plan, top2

    def _draft_blocks(self, reqs: list[DraftRequest]) -> list[Proposal]:
        """DraftModelDrafter's loop (the real forwards), steered by the plan of every request
        (those a chunked prefill holds back are not drafted, so not planned)."""
        plans = [self._plan(r.seq_id, self._session(r.seq_id).tokens, r.k) for r in reqs]
        kmax = max(r.k for r in reqs)

        def pad(rows: list[list[int | None]]) -> torch.Tensor:  # [n, kmax], -1: the model's own
            return torch.tensor([[-1 if t is None else t for t in p] + [-1] * (kmax - len(p)) for p in rows],
                                dtype=torch.int64).to(self.device, non_blocking=True)

        self._steer = pad([p for p, _ in plans]), pad([t for _, t in plans])
        try:
            return super()._draft_blocks(reqs)
        finally:
            self._steer = None

    def _planned(self, reqs: list[DraftRequest], sessions: list[Any], kmax: int) -> torch.Tensor | None:
        return None if self._steer is None else self._steer[0]  # [n, kmax]: lets a block run as one CUDA graph

    def _choose(self, logits: torch.Tensor, batch: SamplingBatch, rows: torch.Tensor | None,
                step: int) -> tuple[torch.Tensor, None]:
        plan = self._steer[0][:, step] if rows is None else self._steer[0][rows, step]  # [m]
        return torch.where(plan >= 0, plan, logits.argmax(-1)), None  # the draft's own pick: its real cost

    def _ranked(self, ids: torch.Tensor, probs: torch.Tensor, chosen: torch.Tensor, rows: torch.Tensor | None,
                step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        chosen_p = probs[:, 0]  # the model's own top-m, then the oracle's ranks where it knows them
        m = ids.shape[1]
        top2 = self._steer[1][:, step] if rows is None else self._steer[1][rows, step]  # [m]
        known = top2 >= 0
        ids, probs = ids.clone(), probs.clone()
        ids[:, 0] = chosen
        probs[:, 0] = torch.where(known, self.alpha, probs[:, 0])
        chosen_p = torch.where(known, self.alpha, chosen_p)
        if m > 1:
            ids[:, 1] = torch.where(known, top2, ids[:, 1])
            probs[:, 1] = torch.where(known, (1 - self.alpha) * self.beta, probs[:, 1])
        return ids, probs, chosen_p


def refuse_sampled(d: Any, seq_id: int) -> None:
    """An oracle knows greedy continuations only: a sampled session is refused at open."""
    if not d.sessions[seq_id].params.greedy:
        del d.sessions[seq_id]
        raise SessionError("the oracle drafter serves greedy requests only")


def follow_reference(d: Any, seq_id: int) -> None:
    """Match a new session to the reference whose prompt it opens with (none: the model's own tokens)."""
    tokens = d.sessions[seq_id].tokens
    ref = d._by_prompt.get(tuple(tokens))
    if ref is not None:
        d._ref_of[seq_id] = ref
        d._checked[seq_id] = len(tokens)


def confident_random_model(shape: dict, device: torch.device, dtype: torch.dtype, *, seed: int = 0,
                           layer_std: float = 0.004) -> tuple[Any, Any, list[int]]:
    """Real-shaped Llama whose greedy next token is perm[current token] by a wide margin.

    Embeddings ~ N(0, 1); the decoder layers' weights are small (`layer_std`) so the residual
    stream stays close to the current token's embedding; LM head row perm[t] = embedding t / sqrt(H).
    The true logit is then ~sqrt(H) while the others are ~N(0, 1): no rounding can flip it.
    Returns (ModelConfig, model, perm).
    """
    from specsplit.runtime.random_weights import random_model

    cfg, model = random_model(dict(shape, tie_word_embeddings=False), device, dtype, seed=seed, std=layer_std)
    v, h = cfg.vocab_size, cfg.hidden_size
    perm = torch.randperm(v, generator=torch.Generator().manual_seed(seed + 1))  # [V]
    gen = torch.Generator(device=device).manual_seed(seed + 2)
    with torch.no_grad():
        emb = torch.randn(v, h, generator=gen, device=device).to(dtype)  # [V, H]
        model.embed_tokens.weight.copy_(emb)
        head = model.lm_head.weight  # [V (padded), H]
        head[perm.to(device)] = emb * (1.0 / h**0.5)
    return cfg, model, perm.tolist()
