"""The target side of speculation: prefill and verify many sessions in one forward.

A session's cache holds every committed token except the last one the target emitted
(`pending`), which is fed at the start of the next step together with the draft block.
One step per session therefore feeds `[pending] + drafts` (or `prompt + drafts` on the
first step), reads logits at the last `len(drafts) + 1` positions, and keeps
`accepted` drafts: the rollback is a cache truncation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from specsplit.runtime.runner import ModelRunner, StepInput
from specsplit.sampling.logits import (
    SamplingBatch,
    extend_seen_with_drafts,
    logprobs_of,
    make_generator,
    process_logits,
    seen_mask,
)
from specsplit.sampling.params import SamplingParams
from specsplit.sampling.rejection import rejection_sample


class SessionError(ValueError):
    """A request that does not fit the session's state (unknown id, wrong order, bad ids)."""


class UnknownSession(KeyError):
    """No such session (already closed or never opened): gRPC NOT_FOUND."""


@dataclass
class TargetSession:
    seq_id: int
    params: SamplingParams
    generator: torch.Generator | None
    history: list[int]  # prompt + committed tokens (drives the repetition penalty)
    unfed: list[int]  # tokens emitted/committed but not yet in the cache
    num_logprobs: int | None = None


@dataclass
class VerifyItem:
    """One session's request for this step."""

    seq_id: int
    draft_ids: list[int] = field(default_factory=list)  # the block to verify, may be empty
    q_ids: Tensor | None = None  # [k, K] int64 sparse draft support (sampled requests)
    q_probs: Tensor | None = None  # [k, K] float32 the probabilities the draft sampled from


@dataclass
class VerifyResult:
    seq_id: int
    num_accepted: int  # drafts kept, 0..len(draft_ids)
    emitted: list[int]  # draft_ids[:num_accepted] + [next token]
    logprobs: list[dict[int, float]] | None  # per emitted token: {id: logprob} incl. top-N
    verify_ns: int  # wall time of the batched step this result came from
    # [len(emitted) - 1 + tokens fed before the block, D] when hidden states are exposed (EAGLE):
    # the target's state at every fed position up to the last accepted one, i.e. the state that
    # predicted each token after it; D = len(hidden_layers) * hidden_size
    hidden_states: Tensor | None = None


class TargetVerifier:
    """Owns the target runner and every open session's sampling state."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.sessions: dict[int, TargetSession] = {}
        self.vocab_size = runner.cfg.vocab_size
        self.hidden_layers: tuple[int, ...] = ()  # layers whose states each step returns (EAGLE heads)

    def expose_hidden(self, layers: tuple[int, ...]) -> None:
        """Return hidden states from every step from now on (numbering of `ModelRunner.forward_hidden`)."""
        if not all(0 <= i <= self.runner.cfg.num_layers for i in layers):
            raise ValueError(f"hidden layers {layers} outside 0..{self.runner.cfg.num_layers}")
        self.hidden_layers = tuple(layers)

    def open(self, seq_id: int, token_ids: list[int], params: SamplingParams) -> None:
        """Register a session; its tokens are prefilled by the next `step` that names it."""
        if seq_id in self.sessions:
            raise SessionError(f"session {seq_id} is already open")
        self.check_ids(token_ids, "prompt")
        if not token_ids:
            raise SessionError("prompt is empty")
        if len(token_ids) >= self.runner.max_model_len:
            raise SessionError(f"prompt of {len(token_ids)} tokens does not fit max_model_len "
                               f"{self.runner.max_model_len}")
        self.runner.add(seq_id)
        self.sessions[seq_id] = TargetSession(
            seq_id, params, make_generator(params, self.runner.device), list(token_ids), list(token_ids),
            params.logprobs,
        )

    def close(self, seq_id: int) -> None:
        if self.sessions.pop(seq_id, None) is not None:
            self.runner.free(seq_id)

    def check_ids(self, ids: list[int], what: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise SessionError(f"{what} has token id(s) outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")

    def step(self, items: list[VerifyItem]) -> list[VerifyResult]:
        """Verify every item's block in one batched forward; sessions advance by accepted + 1."""
        t0 = time.perf_counter_ns()
        sessions = []
        for it in items:
            s = self.sessions.get(it.seq_id)
            if s is None:
                raise UnknownSession(f"no open target session {it.seq_id}")
            self.check_ids(it.draft_ids, "draft block")
            if not s.params.greedy and it.draft_ids and it.q_ids is None:
                raise SessionError(f"session {it.seq_id}: a sampled request needs the draft distribution q")
            sessions.append(s)
        n_hidden = [len(s.unfed) + len(it.draft_ids) if self.hidden_layers else 0 for it, s in zip(items, sessions, strict=True)]
        inputs = [StepInput(it.seq_id, s.unfed + it.draft_ids, len(it.draft_ids) + 1, n)
                  for it, s, n in zip(items, sessions, n_hidden, strict=True)]
        hidden = None
        if self.hidden_layers:
            logits, hidden = self.runner.forward_hidden(inputs, self.hidden_layers)  # hidden: [sum(n_hidden), D]
        else:
            logits = self.runner.forward(inputs)  # [sum(k_i + 1), V]
        results = self._accept(items, sessions, logits)
        dt = time.perf_counter_ns() - t0
        offset = 0
        for it, s, r, n in zip(items, sessions, results, n_hidden, strict=True):
            if hidden is not None:  # states up to the last accepted position; the rest were rejected
                r.hidden_states = hidden[offset : offset + len(s.unfed) + r.num_accepted]
                offset += n
            fed = self.runner.length(it.seq_id)
            self.runner.truncate(it.seq_id, fed - len(it.draft_ids) + r.num_accepted)
            s.history.extend(r.emitted)
            s.unfed = [r.emitted[-1]]
            r.verify_ns = dt
        return results

    def _accept(self, items: list[VerifyItem], sessions: list[TargetSession], logits: Tensor) -> list[VerifyResult]:
        device = logits.device
        b = len(items)
        ks = [len(it.draft_ids) for it in items]
        kmax = max(ks)
        # scatter the ragged rows into a padded [B, kmax+1, V] view
        row_of = torch.tensor([i for i, k in enumerate(ks) for _ in range(k + 1)], device=device)
        col_of = torch.tensor([j for k in ks for j in range(k + 1)], device=device)
        params = [s.params for s in sessions]
        batch = SamplingBatch.from_params(params, device, [s.generator for s in sessions])
        rows = batch.repeat_interleave(kmax + 1)
        padded = logits.new_zeros(b, kmax + 1, logits.shape[-1])
        padded[row_of, col_of] = logits
        drafts = torch.full((b, max(kmax, 1)), -1, dtype=torch.int64)
        for i, it in enumerate(items):
            drafts[i, : ks[i]] = torch.tensor(it.draft_ids, dtype=torch.int64)
        drafts = drafts[:, :kmax].to(device)
        seen = None
        if rows.any_penalty:
            base = seen_mask([torch.tensor(s.history) for s in sessions], self.vocab_size, device)
            seen = extend_seen_with_drafts(base, drafts).reshape(b * (kmax + 1), -1)
        probs = process_logits(padded.reshape(b * (kmax + 1), -1), rows, seen)  # [B*(k+1), V]
        probs = probs.view(b, kmax + 1, -1)
        argmax = probs.argmax(-1)  # [B, kmax+1]
        q_ids = q_probs = None
        if not batch.all_greedy:  # sampled rows need q even when no row drafted (k = 0: [B, 0, 1])
            kq = max((it.q_ids.shape[-1] for it in items if it.q_ids is not None), default=1)
            q_ids = torch.zeros(b, kmax, kq, dtype=torch.int64, device=device)
            q_probs = torch.zeros(b, kmax, kq, dtype=torch.float32, device=device)
            for i, it in enumerate(items):
                if it.q_ids is not None and ks[i]:
                    q_ids[i, : ks[i], : it.q_ids.shape[-1]] = it.q_ids.to(device)
                    q_probs[i, : ks[i], : it.q_probs.shape[-1]] = it.q_probs.to(device)
        num_acc, next_tok = rejection_sample(
            probs, argmax, drafts, torch.tensor(ks, device=device), q_ids, q_probs,
            batch.is_greedy, batch.generators,
        )
        num_acc_l, next_l = num_acc.tolist(), next_tok.tolist()
        want_lp = [s.num_logprobs is not None for s in sessions]
        results = []
        for i, it in enumerate(items):
            emitted = it.draft_ids[: num_acc_l[i]] + [next_l[i]]
            lps = None
            if want_lp[i]:
                lps = self._logprobs(padded[i, : len(emitted)], emitted, sessions[i].num_logprobs or 0)
            results.append(VerifyResult(it.seq_id, num_acc_l[i], emitted, lps, 0))
        return results

    @staticmethod
    def _logprobs(logits: Tensor, emitted: list[int], num_top: int) -> list[dict[int, float]]:
        ids = torch.tensor(emitted, device=logits.device)
        chosen, top_ids, top_lp = logprobs_of(logits, ids, num_top)
        out = []
        for j, tok in enumerate(emitted):
            d = {int(t): float(v) for t, v in zip(top_ids[j].tolist(), top_lp[j].tolist(), strict=True)}
            d[tok] = float(chosen[j])
            out.append(d)
        return out
