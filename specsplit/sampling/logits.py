"""Batched logits processing and sampling, one row per (sequence, position).

Both tiers use these: the draft to build the distribution it samples from, the target to
build the distribution it verifies against. They must apply the same steps in the same
order (vLLM's: logit bias, repetition / frequency / presence penalties, temperature, top-k,
top-p, min-p, softmax) or the speculation stops being lossless. Everything runs on the
device the tensors are on.

Two histories drive the penalties: `seen` (prompt + output, the repetition penalty's, as HF)
and `counts` (output tokens only, the frequency and presence penalties', as OpenAI and vLLM).
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
    presence_penalty: Tensor | None = None  # [N] float32, 0 = off; None: all rows off
    frequency_penalty: Tensor | None = None  # [N] float32, 0 = off; None: all rows off
    # logit bias as a sparse list (a dense [N, V] would cost V floats per row on every step)
    bias_rows: Tensor | None = None  # [M] int64 row of each entry; None: no bias anywhere
    bias_ids: Tensor | None = None  # [M] int64 token id
    bias_values: Tensor | None = None  # [M] float32 added to that token's logit
    all_greedy: bool | None = None  # every row takes the argmax: no randomness at all
    any_greedy: bool | None = None
    any_top_k: bool | None = None  # among sampled rows (greedy rows ignore truncation)
    any_top_p: bool | None = None
    any_min_p: bool | None = None
    any_penalty: bool | None = None  # repetition penalty, among all rows (it moves the argmax too)
    any_output_penalty: bool | None = None  # presence or frequency penalty, among all rows

    def __post_init__(self) -> None:
        n = self.temperature.shape[0]
        if self.presence_penalty is None:
            self.presence_penalty = torch.zeros(n, device=self.temperature.device)
        if self.frequency_penalty is None:
            self.frequency_penalty = torch.zeros(n, device=self.temperature.device)
        for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "is_greedy",
                     "presence_penalty", "frequency_penalty"):
            t = getattr(self, name)
            if t.dim() != 1 or t.shape[0] != n:
                raise ValueError(f"{name} must have shape [{n}], got {list(t.shape)}")
        if len(self.generators) != n:
            raise ValueError(f"generators must have {n} entries, got {len(self.generators)}")
        bias = (self.bias_rows, self.bias_ids, self.bias_values)
        if any(t is not None for t in bias) and not all(
            t is not None and t.dim() == 1 and t.shape == bias[0].shape for t in bias  # type: ignore[union-attr]
        ):
            raise ValueError("bias_rows, bias_ids and bias_values must be given together, each of shape [M]")
        self.generators = list(self.generators)
        if self.any_output_penalty is None:
            self.any_output_penalty = bool(
                ((self.presence_penalty != 0) | (self.frequency_penalty != 0)).any()
            )
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
            presence_penalty=torch.tensor(
                [p.presence_penalty for p in params], dtype=torch.float32, device=device
            ),
            frequency_penalty=torch.tensor(
                [p.frequency_penalty for p in params], dtype=torch.float32, device=device
            ),
            **_sparse_bias(params, device),
            all_greedy=all(greedy),
            any_greedy=any(greedy),
            any_top_k=any(p.top_k > 0 for p in sampled),
            any_top_p=any(p.top_p < 1.0 for p in sampled),
            any_min_p=any(p.min_p > 0.0 for p in sampled),
            any_penalty=any(p.repetition_penalty != 1.0 for p in params),
            any_output_penalty=any(p.presence_penalty or p.frequency_penalty for p in params),
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
            presence_penalty=self.presence_penalty.repeat_interleave(repeats),  # type: ignore[union-attr]
            frequency_penalty=self.frequency_penalty.repeat_interleave(repeats),  # type: ignore[union-attr]
            **self._bias_repeated(repeats),
            all_greedy=self.all_greedy,
            any_greedy=self.any_greedy,
            any_top_k=self.any_top_k,
            any_top_p=self.any_top_p,
            any_min_p=self.any_min_p,
            any_penalty=self.any_penalty,
            any_output_penalty=self.any_output_penalty,
        )

    def _bias_repeated(self, repeats: int) -> dict[str, Tensor | None]:
        """Bias entries of row r become entries of rows r * repeats .. r * repeats + repeats - 1."""
        if self.bias_rows is None:
            return {}
        step = torch.arange(repeats, device=self.bias_rows.device)  # [R]
        rows = (self.bias_rows.unsqueeze(1) * repeats + step).reshape(-1)  # [M * R]
        return {"bias_rows": rows, "bias_ids": self.bias_ids.repeat_interleave(repeats),  # type: ignore[union-attr]
                "bias_values": self.bias_values.repeat_interleave(repeats)}  # type: ignore[union-attr]

    def _bias_selected(self, rows: Tensor) -> dict[str, Tensor | None]:
        """Bias entries of the selected rows, renumbered to their place in `rows`."""
        if self.bias_rows is None:
            return {}
        new_index = torch.full((self.num_rows,), -1, dtype=torch.int64, device=rows.device)
        new_index[rows] = torch.arange(rows.shape[0], device=rows.device)
        mapped = new_index[self.bias_rows]  # [M]
        keep = mapped >= 0
        return {"bias_rows": mapped[keep], "bias_ids": self.bias_ids[keep],  # type: ignore[index]
                "bias_values": self.bias_values[keep]}  # type: ignore[index]

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
            presence_penalty=self.presence_penalty[rows],  # type: ignore[index]
            frequency_penalty=self.frequency_penalty[rows],  # type: ignore[index]
            **self._bias_selected(rows),
        )


def _sparse_bias(params: Sequence[SamplingParams], device: torch.device | str) -> dict[str, Tensor]:
    """The requests' logit_bias dicts as flat (row, id, value) tensors; {} when none has one."""
    entries = [(i, t, b) for i, p in enumerate(params) for t, b in (p.logit_bias or {}).items()]
    if not entries:
        return {}
    rows, ids, values = zip(*entries, strict=True)
    return {
        "bias_rows": torch.tensor(rows, dtype=torch.int64, device=device),
        "bias_ids": torch.tensor(ids, dtype=torch.int64, device=device),
        "bias_values": torch.tensor(values, dtype=torch.float32, device=device),
    }


def make_generator(params: SamplingParams, device: torch.device | str) -> torch.Generator | None:
    """A generator seeded from the request's seed, or None to use the global RNG."""
    if params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def argmax_is_enough(params: SamplingParams) -> bool:
    """True when the token is the argmax of the raw logits: greedy, and no processor that moves
    the argmax (bias, penalties). Lets the hot path skip building probabilities."""
    return (params.greedy and params.repetition_penalty == 1.0 and params.presence_penalty == 0.0
            and params.frequency_penalty == 0.0 and not params.logit_bias)


def process_logits(
    logits: Tensor, batch: SamplingBatch, seen: Tensor | None = None, counts: Tensor | None = None
) -> Tensor:
    """Turn raw logits into the distribution each row samples from (or verifies against).

    logits: # [N, V] any float dtype; seen: # [N, V] bool (prompt + output), needed when a
    row has a repetition penalty; counts: # [N, V] float32 (output only), needed when a row
    has a presence or frequency penalty. Returns probs # [N, V] float32; greedy rows are
    one-hot at the argmax of the penalised logits, so greedy and sampled rows share one
    code path later.
    """
    n, v = _check_rows(logits, batch, "logits")
    x = penalised_logits(logits, batch, seen, counts)  # [N, V]
    argmax = x.argmax(dim=-1)  # [N]
    if batch.all_greedy:
        return _one_hot(argmax, v)
    probs = _sampling_logits(x, batch).softmax(dim=-1)  # [N, V]
    if batch.any_greedy:
        probs = torch.where(batch.is_greedy.unsqueeze(1), _one_hot(argmax, v), probs)
    return probs


def processed_logprobs(
    logits: Tensor, batch: SamplingBatch, seen: Tensor | None = None, counts: Tensor | None = None
) -> Tensor:
    """Log-probabilities of the distribution each row samples from, for the API's logprobs.

    vLLM's "processed" logprobs: after bias, penalties, temperature and truncation (tokens
    cut by top-k / top-p / min-p get -inf). A greedy row takes no temperature or truncation,
    so its logprobs are those of its penalised logits (not the one-hot it picks from).
    Same arguments as `process_logits`; returns # [N, V] float32.
    """
    _check_rows(logits, batch, "logits")
    x = penalised_logits(logits, batch, seen, counts)  # [N, V]
    if batch.all_greedy:
        return x.log_softmax(dim=-1)
    lp = _sampling_logits(x, batch).log_softmax(dim=-1)  # [N, V]
    if batch.any_greedy:
        lp = torch.where(batch.is_greedy.unsqueeze(1), x.log_softmax(dim=-1), lp)
    return lp


def penalised_logits(
    logits: Tensor, batch: SamplingBatch, seen: Tensor | None = None, counts: Tensor | None = None
) -> Tensor:
    """Logit bias, then the repetition, frequency and presence penalties: the steps that move
    the argmax, so greedy rows take them too. Returns a float32 copy # [N, V]."""
    n, v = _check_rows(logits, batch, "logits")
    x = logits.to(torch.float32, copy=True)  # [N, V]
    if batch.bias_rows is not None:
        x = apply_logit_bias(x, batch.bias_rows, batch.bias_ids, batch.bias_values)  # type: ignore[arg-type]
    if batch.any_penalty:
        if seen is None or seen.shape != (n, v):
            raise ValueError(f"seen must have shape [{n}, {v}] when a row has a penalty")
        x = apply_repetition_penalty(x, seen, batch.repetition_penalty)
    if batch.any_output_penalty:
        if counts is None or counts.shape != (n, v):
            raise ValueError(f"counts must have shape [{n}, {v}] when a row has a presence or frequency penalty")
        x = apply_output_penalties(x, counts, batch.presence_penalty, batch.frequency_penalty)  # type: ignore[arg-type]
    return x


def _sampling_logits(x: Tensor, batch: SamplingBatch) -> Tensor:
    """Temperature, then top-k / top-p, then min-p (truncated tokens at -inf). x: # [N, V]."""
    temperature = torch.where(batch.is_greedy, 1.0, batch.temperature)  # [N]
    x = x / temperature.unsqueeze(1)
    if batch.any_top_k or batch.any_top_p:
        x = apply_top_k_top_p(
            x, batch.top_k if batch.any_top_k else None, batch.top_p if batch.any_top_p else None
        )
    if batch.any_min_p:
        x = apply_min_p(x, batch.min_p)
    return x


def apply_logit_bias(logits: Tensor, rows: Tensor, ids: Tensor, values: Tensor) -> Tensor:
    """Add values[m] to logits[rows[m], ids[m]] (OpenAI's logit_bias); ids >= V are skipped.

    logits: # [N, V] float32, changed in place and returned; rows, ids: # [M] int64; values: # [M].
    """
    v = logits.shape[1]
    inside = ids < v  # [M] the tiers refuse such ids; a stray one must not index out of range
    logits.index_put_((rows[inside], ids[inside]), values[inside].to(logits.dtype), accumulate=True)
    return logits


def apply_output_penalties(logits: Tensor, counts: Tensor, presence: Tensor, frequency: Tensor) -> Tensor:
    """OpenAI's rule: logit -= frequency * count + presence * (count > 0), count over the output.

    logits, counts: # [N, V] float32; presence, frequency: # [N] float32.
    """
    return logits - frequency.unsqueeze(1) * counts - presence.unsqueeze(1) * (counts > 0).float()


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
    """Logprobs of the raw model distribution (prompt logprobs, as vLLM returns them).

    logits: # [N, V]; token_ids: # [N] int64 the chosen tokens. Returns chosen # [N]
    float32, top ids # [N, num_top] int64 and top logprobs # [N, num_top] float32.
    """
    return pick_logprobs(logits.float().log_softmax(dim=-1), token_ids, num_top)


def pick_logprobs(logprobs: Tensor, token_ids: Tensor, num_top: int) -> tuple[Tensor, Tensor, Tensor]:
    """The chosen tokens' logprobs and the num_top best of each row.

    logprobs: # [N, V] float32 (e.g. `processed_logprobs`); token_ids: # [N] int64.
    Returns chosen # [N], top ids # [N, num_top] int64, top logprobs # [N, num_top].
    """
    if logprobs.dim() != 2 or token_ids.shape != (logprobs.shape[0],):
        raise ValueError(
            f"need logprobs [N, V] and token_ids [N], got {list(logprobs.shape)}, "
            f"{list(token_ids.shape)}"
        )
    if num_top < 0:
        raise ValueError(f"num_top must be >= 0, got {num_top}")
    chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)  # [N]
    top_logprobs, top_ids = logprobs.topk(min(num_top, logprobs.shape[1]), dim=-1)  # [N, num_top]
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
