"""Drafters: propose blocks of tokens for many sessions at once, behind one interface.

A request says "your sequence is now your own tokens[:prefix_len], followed by
`new_tokens`; propose k tokens". Addressing by absolute length makes rollback after a
rejection, catching up after rounds without drafting, and the pipelined guess of the next
block (prefix = all drafts accepted, no new tokens, k + 1 tokens: the first one is the
guess of the target's bonus token) the same operation: truncate, append, draft.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import Tensor

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


@dataclass
class Proposal:
    token_ids: list[int]  # the block, len == k
    q_ids: Tensor | None = None  # [k, K] sparse support the block was sampled from (None: greedy)
    q_probs: Tensor | None = None  # [k, K]
    draft_ns: int = 0  # the batched step(s) that made it
    queue_ns: int = 0  # served: how long the request waited for its batch (as the draft tier reported it)
    prefilling: bool = False  # empty because this step cached a chunk of a long prompt instead


@dataclass
class DraftSession:
    seq_id: int
    params: SamplingParams
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)  # prompt + committed + last proposals
    prompt_len: int = 0  # tokens[prompt_len:] were generated (frequency / presence penalties)


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


class Drafter(ABC):
    """Common session bookkeeping; subclasses only say how a batch of blocks is made."""

    method: str = ""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.sessions: dict[int, DraftSession] = {}

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
        if self.sessions.pop(seq_id, None) is not None:
            self._on_close(seq_id)

    def propose(self, reqs: list[DraftRequest]) -> list[Proposal]:
        t0 = time.perf_counter_ns()
        for r in reqs:
            s = self.sessions.get(r.seq_id)
            if s is None:
                raise UnknownSession(f"no open draft session {r.seq_id}")
            if not 0 < r.prefix_len <= len(s.tokens):
                raise SessionError(f"draft session {r.seq_id}: prefix_len {r.prefix_len} outside 1..{len(s.tokens)}")
            if r.k < 0:
                raise SessionError(f"k must be >= 0, got {r.k}")
            self._check(r.new_tokens, "committed tokens")
        for r in reqs:
            s = self.sessions[r.seq_id]
            del s.tokens[r.prefix_len :]
            s.tokens.extend(r.new_tokens)
            # tokens past prefix_len may have changed; the last token must be fed again
            self._rollback(r.seq_id, min(r.prefix_len, len(s.tokens) - 1))
        active = [r for r in reqs if r.k > 0]
        made = dict(zip([r.seq_id for r in active], self._draft(active), strict=True)) if active else {}
        out = []
        dt = time.perf_counter_ns() - t0
        for r in reqs:
            p = made.get(r.seq_id, Proposal([]))
            self.sessions[r.seq_id].tokens.extend(p.token_ids)
            p.draft_ns = dt
            out.append(p)
        return out

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

    def _draft(self, reqs: list[DraftRequest]) -> list[Proposal]:
        uncached = [len(self.sessions[r.seq_id].tokens) - self.runner.length(r.seq_id) for r in reqs]
        chunks = plan_chunks(uncached, uncached, self.prefill_chunk)
        cut = [StepInput(r.seq_id, self._uncached(r.seq_id)[:n]) for r, n in zip(reqs, chunks, strict=True) if n]
        if cut:
            self.runner.forward(cut)  # prefill only: the logits are not used
        whole = [r for r, n in zip(reqs, chunks, strict=True) if n is None]
        made = dict(zip([r.seq_id for r in whole], self._draft_blocks(whole), strict=True)) if whole else {}
        return [made.get(r.seq_id, Proposal([], prefilling=True)) for r in reqs]

    def _uncached(self, seq_id: int) -> list[int]:
        return self.sessions[seq_id].tokens[self.runner.length(seq_id) :]

    def _draft_blocks(self, reqs: list[DraftRequest]) -> list[Proposal]:
        """Draft k tokens for each request, whose uncached tokens fit one step."""
        sessions = [self.sessions[r.seq_id] for r in reqs]
        batch = SamplingBatch.from_params([s.params for s in sessions], self.device, [s.generator for s in sessions])
        if batch.any_penalty or batch.any_output_penalty:
            return self._draft_with_penalty(reqs, sessions, batch)
        # every token stays on the device until the block is done: the chosen tokens are fed
        # straight back (ModelRunner.forward's device_ids), one host copy per block, not per token
        n, kmax = len(reqs), max(r.k for r in reqs)
        plan = self._planned(reqs, sessions, kmax)  # [n, kmax] or None
        toks = torch.zeros(n, kmax, dtype=torch.int64, device=self.device)  # [n, kmax]
        sparse: list[tuple[Tensor, Tensor, list[int]]] = []  # per step: ids [m, K], probs [m, K], rows
        inputs = [StepInput(r.seq_id, s.tokens[self.runner.length(r.seq_id) :]) for r, s in zip(reqs, sessions, strict=True)]
        live = list(range(n))
        fed: Tensor | None = None
        for j in range(kmax):
            logits = self.runner.forward([inputs[i] for i in live], fed)  # [len(live), V]
            sub = batch.select(torch.tensor(live, device=self.device)) if len(live) < n else batch
            if sub.all_greedy and sub.bias_rows is None:
                step = logits.argmax(-1)  # [m]: the argmax of the processed distribution too
                if plan is not None:
                    want = plan[:, j] if len(live) == n else plan[torch.tensor(live, device=self.device), j]
                    step = torch.where(want >= 0, want, step)
            else:
                ids, p = topk_truncate(process_logits(logits, sub), self.top_k)  # [m, K]
                step = sample_sparse(ids, p, sub)
                sparse.append((ids, p, live))
            rows = torch.tensor(live, device=self.device) if len(live) < n else None
            if rows is None:
                toks[:, j] = step
            else:
                toks[rows, j] = step
            keep = [x for x, i in enumerate(live) if reqs[i].k > j + 1]
            live = [live[x] for x in keep]
            if not live:
                break
            fed = step if len(keep) == len(step) else step[torch.tensor(keep, device=self.device)]
            if j == 0 and len(live) == n and batch.all_greedy and batch.bias_rows is None \
                    and all(r.k == kmax for r in reqs):
                # the rest of the block in one CUDA graph replay (None: no graphs here, step on)
                rest = self.runner.forward_chain([r.seq_id for r in reqs], fed, kmax - 1,
                                                 None if plan is None else plan[:, 1:]) \
                    if hasattr(self.runner, "forward_chain") else None
                if rest is not None:
                    toks[:, 1:] = rest
                    break
            for i in live:
                inputs[i] = StepInput(reqs[i].seq_id, [0])  # placeholder: the id comes from `fed`
        blocks = toks.tolist()
        out = []
        for i, (r, s) in enumerate(zip(reqs, sessions, strict=True)):
            if s.params.greedy:
                out.append(Proposal(blocks[i][: r.k]))
                continue
            q_ids = torch.stack([ids[rows.index(i)] for ids, _, rows in sparse[: r.k]])
            q_probs = torch.stack([p[rows.index(i)] for _, p, rows in sparse[: r.k]])
            out.append(Proposal(blocks[i][: r.k], q_ids, q_probs))
        return out

    def _planned(self, reqs: list[DraftRequest], sessions: list[DraftSession], kmax: int) -> Tensor | None:
        """Tokens to propose instead of the model's own greedy choice # [n, kmax], -1 = the model's;
        None: all the model's. A hook for benchmarks (their oracle drafter); greedy sessions only."""
        return None

    def _draft_with_penalty(self, reqs: list[DraftRequest], sessions: list[DraftSession],
                            batch: SamplingBatch) -> list[Proposal]:
        """The repetition penalty needs each token on the host to update what was seen."""
        blocks: list[list[int]] = [[] for _ in reqs]
        q_ids: list[list[Tensor]] = [[] for _ in reqs]
        q_probs: list[list[Tensor]] = [[] for _ in reqs]
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
                toks = probs.argmax(-1).tolist()
            else:
                ids, p = topk_truncate(probs, self.top_k)  # [n, K]
                toks = sample_sparse(ids, p, sub).tolist()
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
            if s.params.greedy:
                out.append(Proposal(blocks[i]))
            else:
                out.append(Proposal(blocks[i], torch.stack(q_ids[i]), torch.stack(q_probs[i])))
        return out
