"""Protobuf <-> domain conversions, so protobuf stays at the edges of every service."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from specsplit.proto.v1 import common_pb2
from specsplit.sampling.params import SamplingParams

_OPTIONAL = ("n", "temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "logprobs", "repetition_penalty",
             "presence_penalty", "frequency_penalty", "prompt_logprobs")
_FLOATS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


def params_from_pb(pb: common_pb2.SamplingParams) -> SamplingParams:
    """Unset optional fields keep vLLM's defaults; validation errors are ValueErrors."""
    kw: dict[str, Any] = {f: getattr(pb, f) for f in _OPTIONAL if pb.HasField(f)}
    if pb.stop:
        kw["stop"] = list(pb.stop)
    if pb.stop_token_ids:
        kw["stop_token_ids"] = list(pb.stop_token_ids)
    kw["ignore_eos"] = pb.ignore_eos
    if pb.logit_bias:
        kw["logit_bias"] = dict(pb.logit_bias)
    for f in _FLOATS:
        if f in kw:
            kw[f] = float(kw[f])
    return SamplingParams(**kw)


def params_to_pb(p: SamplingParams) -> common_pb2.SamplingParams:
    pb = common_pb2.SamplingParams(
        n=p.n, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p,
        repetition_penalty=p.repetition_penalty, ignore_eos=p.ignore_eos,
        stop=list(p.stop or []), stop_token_ids=list(p.stop_token_ids or []),
        presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty, logit_bias=p.logit_bias or {},
    )
    if p.seed is not None:
        pb.seed = p.seed
    if p.max_tokens is not None:
        pb.max_tokens = p.max_tokens
    if p.logprobs is not None:
        pb.logprobs = p.logprobs
    if p.prompt_logprobs is not None:
        pb.prompt_logprobs = p.prompt_logprobs
    return pb


def sparse_to_pb(ids: Tensor | None, probs: Tensor | None) -> list[common_pb2.SparseDistribution]:
    """[k, K] ids/probs -> one SparseDistribution per block token."""
    if ids is None or probs is None:
        return []
    ids_l, probs_l = ids.tolist(), probs.tolist()
    return [common_pb2.SparseDistribution(ids=i, probs=p) for i, p in zip(ids_l, probs_l, strict=True)]


def sparse_from_pb(q: list[common_pb2.SparseDistribution], k: int, vocab_size: int) -> tuple[Tensor | None, Tensor | None]:
    """Validate and pad to [k, K] tensors; ValueError on any malformed distribution."""
    if not q:
        return None, None
    if len(q) != k:
        raise ValueError(f"q has {len(q)} distributions for a block of {k} tokens")
    width = max(len(d.ids) for d in q)
    if width == 0 or width > 1024:
        raise ValueError(f"sparse distributions must have 1..1024 entries, got {width}")
    ids = torch.zeros(k, width, dtype=torch.int64)
    probs = torch.zeros(k, width, dtype=torch.float32)
    for j, d in enumerate(q):
        if len(d.ids) != len(d.probs) or not d.ids:
            raise ValueError(f"q[{j}]: ids and probs must be non-empty and of equal length")
        t_ids = torch.tensor(list(d.ids), dtype=torch.int64)
        t_p = torch.tensor(list(d.probs), dtype=torch.float32)
        if int(t_ids.max()) >= vocab_size:
            raise ValueError(f"q[{j}] has token ids outside the vocabulary [0, {vocab_size})")
        if not torch.isfinite(t_p).all() or (t_p < 0).any() or abs(float(t_p.sum()) - 1.0) > 1e-3:
            raise ValueError(f"q[{j}] is not a probability distribution (finite, >= 0, summing to 1)")
        ids[j, : len(d.ids)] = t_ids
        probs[j, : len(d.probs)] = t_p
    return ids, probs


def logprobs_to_pb(raw: list[dict[int, float]] | None, emitted: list[int]) -> list[common_pb2.TokenLogprobs]:
    if raw is None:
        return []
    out = []
    for tok, d in zip(emitted, raw, strict=True):
        ranked = sorted(((t, v) for t, v in d.items()), key=lambda kv: -kv[1])
        out.append(common_pb2.TokenLogprobs(
            logprob=d[tok], top_ids=[t for t, _ in ranked], top_logprobs=[v for _, v in ranked]))
    return out


def logprobs_from_pb(lps: list[common_pb2.TokenLogprobs], emitted: list[int]) -> list[dict[int, float]] | None:
    if not lps:
        return None
    out = []
    for tok, lp in zip(emitted, lps, strict=True):
        d = dict(zip(lp.top_ids, lp.top_logprobs, strict=True))
        d[tok] = lp.logprob
        out.append(d)
    return out
