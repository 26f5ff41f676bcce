"""Batched logits processing and sampling, one row per (sequence, position).

Both tiers use these: the draft to build the distribution it samples from, the target to
build the distribution it verifies against. They must apply the same steps in the same
order (vLLM's / HF's: repetition penalty, temperature, top-k, top-p, min-p, softmax) or the
speculation stops being lossless. Everything runs on the device the tensors are on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from specsplit.sampling.params import SamplingParams

Generators = Sequence[torch.Generator | None]


@dataclass
class SamplingBatch:
    """Per-row sampling parameters as tensors, one row per (sequence, position).

    The `any_*` / `all_greedy` flags are plain bools computed once (from Python when built
    with `from_params`) so that the common case skips whole steps without a device sync.
    """

    temperature: Tensor  # [N] float32, 0 for greedy rows
    top_k: Tensor  # [N] int64, 0 = off
    top_p: Tensor  # [N] float32, 1 = off
    min_p: Tensor  # [N] float32, 0 = off
    repetition_penalty: Tensor  # [N] float32, 1 = off
    is_greedy: Tensor  # [N] bool
    generators: list[torch.Generator | None]  # [N]; None = global RNG
    all_greedy: bool | None = None  # every row takes the argmax: no randomness at all
    any_greedy: bool | None = None
    any_top_k: bool | None = None  # among sampled rows (greedy rows ignore truncation)
    any_top_p: bool | None = None
    any_min_p: bool | None = None
    any_penalty: bool | None = None  # among all rows (the penalty moves the argmax too)

    def __post_init__(self) -> None:
        n = self.temperature.shape[0]
        for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "is_greedy"):
            t = getattr(self, name)
            if t.dim() != 1 or t.shape[0] != n:
                raise ValueError(f"{name} must have shape [{n}], got {list(t.shape)}")
        if len(self.generators) != n:
            raise ValueError(f"generators must have {n} entries, got {len(self.generators)}")
        self.generators = list(self.generators)
        if None in (
            self.all_greedy,
            self.any_greedy,
            self.any_top_k,
            self.any_top_p,
            self.any_min_p,
            self.any_penalty,
        ):
            self._compute_flags()

    def _compute_flags(self) -> None:
        """Derive the flags from the tensors, with one device sync."""
        sampled = ~self.is_greedy  # [N]
        flags = torch.stack(
            [
                self.is_greedy.all(),
                self.is_greedy.any(),
                (sampled & (self.top_k > 0)).any(),
                (sampled & (self.top_p < 1.0)).any(),
                (sampled & (self.min_p > 0.0)).any(),
                (self.repetition_penalty != 1.0).any(),
            ]
        ).tolist()
        (
            self.all_greedy,
            self.any_greedy,
            self.any_top_k,
            self.any_top_p,
            self.any_min_p,
            self.any_penalty,
        ) = flags

    @property
    def num_rows(self) -> int:
        return self.temperature.shape[0]

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        device: torch.device | str,
        generators: Generators | None = None,
    ) -> SamplingBatch:
        """One row per request. Without `generators`, seeded requests get a fresh generator.

        A caller that samples a request repeatedly must keep its generator and pass it in
        every time; a fresh one per step would replay the same random numbers.
        """
        if generators is None:
            generators = [make_generator(p, device) for p in params]
        greedy = [p.greedy for p in params]
        sampled = [p for p in params if not p.greedy]
        return cls(
            temperature=torch.tensor(
                [0.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)],
                dtype=torch.float32,
                device=device,
            ),
            top_k=torch.tensor([max(p.top_k, 0) for p in params], dtype=torch.int64, device=device),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            min_p=torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device),
            repetition_penalty=torch.tensor(
                [p.repetition_penalty for p in params], dtype=torch.float32, device=device
            ),
            is_greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            generators=list(generators),
            all_greedy=all(greedy),
            any_greedy=any(greedy),
            any_top_k=any(p.top_k > 0 for p in sampled),
            any_top_p=any(p.top_p < 1.0 for p in sampled),
            any_min_p=any(p.min_p > 0.0 for p in sampled),
            any_penalty=any(p.repetition_penalty != 1.0 for p in params),
        )

    def repeat_interleave(self, repeats: int) -> SamplingBatch:
        """Each row `repeats` times in a row: the k + 1 verify positions of one sequence."""
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        return SamplingBatch(
            temperature=self.temperature.repeat_interleave(repeats),
            top_k=self.top_k.repeat_interleave(repeats),
            top_p=self.top_p.repeat_interleave(repeats),
            min_p=self.min_p.repeat_interleave(repeats),
            repetition_penalty=self.repetition_penalty.repeat_interleave(repeats),
            is_greedy=self.is_greedy.repeat_interleave(repeats),
            generators=[g for g in self.generators for _ in range(repeats)],
            all_greedy=self.all_greedy,
            any_greedy=self.any_greedy,
            any_top_k=self.any_top_k,
            any_top_p=self.any_top_p,
            any_min_p=self.any_min_p,
            any_penalty=self.any_penalty,
        )

    def select(self, rows: Tensor) -> SamplingBatch:
        """The sub-batch of `rows` (# [M] int64); flags are recomputed (one sync)."""
        rows_list = rows.tolist()
        return SamplingBatch(
            temperature=self.temperature[rows],
            top_k=self.top_k[rows],
            top_p=self.top_p[rows],
            min_p=self.min_p[rows],
            repetition_penalty=self.repetition_penalty[rows],
            is_greedy=self.is_greedy[rows],
            generators=[self.generators[i] for i in rows_list],
        )


def make_generator(params: SamplingParams, device: torch.device | str) -> torch.Generator | None:
    """A generator seeded from the request's seed, or None to use the global RNG."""
    if params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def seen_mask(histories: Sequence[Tensor], vocab_size: int, device: torch.device | str) -> Tensor:
    """Which ids occur in each row's history (prompt + output), for the repetition penalty.

    histories: N tensors of token ids, # [len_i] int64; ids outside [0, vocab_size) ignored.
    Returns # [N, vocab_size] bool.
    """
    n = len(histories)
    seen = torch.zeros(n * vocab_size + 1, dtype=torch.bool, device=device)  # +1: dump slot
    if n == 0:
        return seen[:-1].view(0, vocab_size)
    ids = torch.cat([h.to(device=device, dtype=torch.int64).reshape(-1) for h in histories])
    lengths = torch.tensor([h.numel() for h in histories], device=device)  # [N]
    rows = torch.repeat_interleave(torch.arange(n, device=device), lengths)  # [total]
    valid = (ids >= 0) & (ids < vocab_size)  # [total]
    flat = torch.where(valid, rows * vocab_size + ids, n * vocab_size)  # [total]
    seen[flat] = True
    return seen[:-1].view(n, vocab_size)


def extend_seen_with_drafts(seen: Tensor, draft_token_ids: Tensor) -> Tensor:
    """The seen mask at each verify position: row j has also seen drafts[:, :j].

    seen: # [B, V] bool; draft_token_ids: # [B, k] int64, negative = padding.
    Returns # [B, k + 1, V] bool.
    """
    b, v = seen.shape
    k = draft_token_ids.shape[1]
    if draft_token_ids.shape[0] != b:
        raise ValueError(f"draft_token_ids must have {b} rows, got {draft_token_ids.shape[0]}")
    device = seen.device
    out = torch.empty(b * (k + 1) * v + 1, dtype=torch.bool, device=device)  # +1: dump slot
    out[:-1].view(b, k + 1, v).copy_(seen.unsqueeze(1))
    bi = torch.arange(b, device=device).view(b, 1, 1)  # [B, 1, 1]
    i = torch.arange(k, device=device).view(1, k, 1)  # [1, k, 1] draft position
    j = torch.arange(k + 1, device=device).view(1, 1, k + 1)  # [1, 1, k+1] verify position
    tok = draft_token_ids.view(b, k, 1)  # [B, k, 1]
    valid = (i < j) & (tok >= 0) & (tok < v)  # [B, k, k+1]
    flat = torch.where(valid, (bi * (k + 1) + j) * v + tok, b * (k + 1) * v)  # [B, k, k+1]
    out[flat.reshape(-1)] = True
    return out[:-1].view(b, k + 1, v)


def argmax_is_enough(params: SamplingParams) -> bool:
    """True when the token is the argmax of the raw logits: greedy, and no processor that moves
    the argmax (the repetition penalty). Lets the hot path skip building probabilities."""
    return params.greedy and params.repetition_penalty == 1.0


def process_logits(logits: Tensor, batch: SamplingBatch, seen: Tensor | None = None) -> Tensor:
    """Turn raw logits into the distribution each row samples from (or verifies against).

    logits: # [N, V] any float dtype; seen: # [N, V] bool, needed when any row has a
    repetition penalty. Returns probs # [N, V] float32; greedy rows are one-hot at the
    argmax of the penalised logits, so greedy and sampled rows share one code path later.
    """
    n, v = _check_rows(logits, batch, "logits")
    x = logits.to(torch.float32, copy=True)  # [N, V]
    if batch.any_penalty:
        if seen is None or seen.shape != (n, v):
            raise ValueError(f"seen must have shape [{n}, {v}] when a row has a penalty")
        x = apply_repetition_penalty(x, seen, batch.repetition_penalty)
    argmax = x.argmax(dim=-1)  # [N]
    if batch.all_greedy:
        return _one_hot(argmax, v)
    temperature = torch.where(batch.is_greedy, 1.0, batch.temperature)  # [N]
    x = x / temperature.unsqueeze(1)
    if batch.any_top_k or batch.any_top_p:
        x = apply_top_k_top_p(
            x, batch.top_k if batch.any_top_k else None, batch.top_p if batch.any_top_p else None
        )
    if batch.any_min_p:
        x = apply_min_p(x, batch.min_p)
    probs = x.softmax(dim=-1)  # [N, V]
    if batch.any_greedy:
        probs = torch.where(batch.is_greedy.unsqueeze(1), _one_hot(argmax, v), probs)
    return probs


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: Tensor) -> Tensor:
    """HF rule: a seen token's logit is divided by the penalty if > 0, else multiplied.

    logits: # [N, V] float32; seen: # [N, V] bool; penalty: # [N] float32.
    """
    p = penalty.unsqueeze(1)  # [N, 1]
    penalised = torch.where(logits > 0, logits / p, logits * p)  # [N, V]
    return torch.where(seen, penalised, logits)


def apply_top_k_top_p(logits: Tensor, top_k: Tensor | None, top_p: Tensor | None) -> Tensor:
    """Mask (to -inf) tokens outside the top k, then outside the top-p nucleus; one sort.

    logits: # [N, V] float32; top_k: # [N] int64, 0 = off; top_p: # [N] float32.
    Ties at the k-th value are all kept (as HF). The most likely token is always kept.
    """
    v = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1)  # [N, V] ascending
    if top_k is not None:
        k = torch.where(top_k > 0, top_k.clamp(max=v), v)  # [N]
        kth = sorted_logits.gather(1, (v - k).unsqueeze(1))  # [N, 1]
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [N, V]
        drop = cum <= (1.0 - top_p).unsqueeze(1)  # [N, V]
        drop[:, -1] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """Mask tokens whose probability is below min_p times the row's largest probability.

    logits: # [N, V] float32; min_p: # [N] float32, 0 = off.
    """
    probs = logits.softmax(dim=-1)  # [N, V]
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)  # [N, 1]
    return logits.masked_fill(probs < threshold, float("-inf"))


def sample(probs: Tensor, batch: SamplingBatch) -> Tensor:
    """One token per row: argmax for greedy rows, else the exponential race.

    argmax(p / E) with E ~ Exponential(1) picks i with probability p_i / sum(p), needs no
    normalisation or cumsum, and draws with the row's own generator when it is seeded.
    probs: # [N, V]. Returns # [N] int64.
    """
    _check_rows(probs, batch, "probs")
    argmax = probs.argmax(dim=-1)  # [N]
    if batch.all_greedy:
        return argmax
    sampled = exponential_race(probs, batch.generators)  # [N]
    return torch.where(batch.is_greedy, argmax, sampled)


def topk_truncate(probs: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The draft's sparse distribution: its k most likely tokens, renormalised.

    This is exactly what the draft samples from and sends to the target, which keeps the
    rejection sampling lossless while sending k (id, prob) pairs instead of V floats.
    probs: # [N, V]. Returns ids # [N, K] int64 (most likely first) and probs # [N, K]
    float32 summing to 1, with K = min(k, V).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if probs.dim() != 2:
        raise ValueError(f"probs must have shape [N, V], got {list(probs.shape)}")
    top_probs, top_ids = probs.float().topk(min(k, probs.shape[1]), dim=-1)  # [N, K]
    top_probs = top_probs / top_probs.sum(dim=-1, keepdim=True)
    return top_ids, top_probs


def sample_sparse(ids: Tensor, probs: Tensor, batch: SamplingBatch) -> Tensor:
    """One token per row from sparse distributions; greedy rows take ids[:, 0].

    ids: # [N, K] int64; probs: # [N, K]. ids[:, 0] must be the argmax (as `topk_truncate`
    returns it). Returns # [N] int64.
    """
    if ids.shape != probs.shape or ids.dim() != 2:
        raise ValueError(f"ids and probs must share shape [N, K], got {ids.shape}, {probs.shape}")
    _check_rows(probs, batch, "probs")
    first = ids[:, 0]  # [N]
    if batch.all_greedy:
        return first
    pick = exponential_race(probs.float(), batch.generators)  # [N]
    sampled = ids.gather(1, pick.unsqueeze(1)).squeeze(1)  # [N]
    return torch.where(batch.is_greedy, first, sampled)


def logprobs_of(logits: Tensor, token_ids: Tensor, num_top: int) -> tuple[Tensor, Tensor, Tensor]:
    """Logprobs of the raw model distribution (as vLLM returns by default).

    logits: # [N, V]; token_ids: # [N] int64 the chosen tokens. Returns chosen # [N]
    float32, top ids # [N, num_top] int64 and top logprobs # [N, num_top] float32.
    """
    if logits.dim() != 2 or token_ids.shape != (logits.shape[0],):
        raise ValueError(
            f"need logits [N, V] and token_ids [N], got {list(logits.shape)}, "
            f"{list(token_ids.shape)}"
        )
    if num_top < 0:
        raise ValueError(f"num_top must be >= 0, got {num_top}")
    logprobs = logits.float().log_softmax(dim=-1)  # [N, V]
    chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)  # [N]
    top_logprobs, top_ids = logprobs.topk(min(num_top, logits.shape[1]), dim=-1)  # [N, num_top]
    return chosen, top_ids, top_logprobs


def exponential_race(weights: Tensor, generators: Generators) -> Tensor:
    """argmax(w / E) per row, E ~ Exponential(1): a sample proportional to w.

    weights: # [N, V] float32, non-negative, any positive scale per row.
    Returns # [N] int64.
    """
    noise = random_per_row(weights.shape, generators, weights.device, _exponential_)  # [N, V]
    noise.clamp_(min=torch.finfo(torch.float32).tiny)  # exponential_ may return 0
    return (weights / noise).argmax(dim=-1)


def uniform_per_row(shape: Sequence[int], generators: Generators, device: torch.device) -> Tensor:
    """U[0, 1) of `shape` (# [N, ...]), row i drawn with generators[i] when it is seeded."""
    return random_per_row(shape, generators, device, _uniform_)


def random_per_row(
    shape: Sequence[int],
    generators: Generators,
    device: torch.device,
    fill: Callable[[Tensor, torch.Generator | None], Tensor],
) -> Tensor:
    """Random float32 `shape` (# [N, ...]); unseeded rows in one draw, seeded rows one by one."""
    out = torch.empty(tuple(shape), dtype=torch.float32, device=device)
    seeded = [i for i, g in enumerate(generators) if g is not None]
    if len(seeded) < out.shape[0]:
        fill(out, None)
    for i in seeded:
        fill(out[i], generators[i])
    return out


def _exponential_(t: Tensor, generator: torch.Generator | None) -> Tensor:
    return t.exponential_(generator=generator)


def _uniform_(t: Tensor, generator: torch.Generator | None) -> Tensor:
    return t.uniform_(generator=generator)


def _one_hot(ids: Tensor, vocab_size: int) -> Tensor:
    """# [N] int64 -> # [N, V] float32."""
    out = torch.zeros(ids.shape[0], vocab_size, dtype=torch.float32, device=ids.device)
    return out.scatter_(1, ids.unsqueeze(1), 1.0)


def _check_rows(x: Tensor, batch: SamplingBatch, name: str) -> tuple[int, int]:
    if x.dim() != 2 or x.shape[0] != batch.num_rows:
        raise ValueError(f"{name} must have shape [{batch.num_rows}, V], got {list(x.shape)}")
    return x.shape[0], x.shape[1]
