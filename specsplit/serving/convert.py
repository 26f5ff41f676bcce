"""Protobuf <-> domain conversions, so protobuf stays at the edges of every service."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from specsplit.outputs import SpecMetrics
from specsplit.proto.v1 import common_pb2, target_pb2
from specsplit.sampling.params import SamplingParams
from specsplit.speculation.session import check_token_ids
from specsplit.speculation.target import VerifyResult

# what a tier needs to choose tokens; the rest of SamplingParams (n, max_tokens, stop,
# stop_token_ids, ignore_eos) decides when to stop, which only the gateway does
TOKEN_CHOICE = ("temperature", "top_p", "top_k", "min_p", "seed", "logprobs", "repetition_penalty",
                "presence_penalty", "frequency_penalty", "prompt_logprobs")
_FLOATS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


def _optional(pb: Any, names: tuple[str, ...]) -> dict[str, Any]:
    kw: dict[str, Any] = {f: getattr(pb, f) for f in names if pb.HasField(f)}
    for f in _FLOATS:
        if f in kw:
            kw[f] = float(kw[f])
    if pb.logit_bias:
        kw["logit_bias"] = dict(pb.logit_bias)
    return kw


def params_from_pb(pb: common_pb2.SamplingParams) -> SamplingParams:
    """A client's request parameters. Unset optional fields keep vLLM's defaults; validation errors are ValueErrors."""
    kw = _optional(pb, ("n", *TOKEN_CHOICE, "max_tokens"))
    if pb.stop:
        kw["stop"] = list(pb.stop)
    if pb.stop_token_ids:
        kw["stop_token_ids"] = list(pb.stop_token_ids)
    kw["ignore_eos"] = pb.ignore_eos
    return SamplingParams(**kw)


def params_to_pb(p: SamplingParams) -> common_pb2.SamplingParams:
    pb = common_pb2.SamplingParams(
        n=p.n, ignore_eos=p.ignore_eos, stop=list(p.stop or []), stop_token_ids=list(p.stop_token_ids or []))
    _choice_into(pb, p)
    if p.max_tokens is not None:
        pb.max_tokens = p.max_tokens
    return pb


def token_choice_from_pb(pb: common_pb2.TokenChoice) -> SamplingParams:
    """A tier session's parameters: the token-choice fields; the stopping ones keep their defaults, unused."""
    return SamplingParams(**_optional(pb, TOKEN_CHOICE))


def token_choice_to_pb(p: SamplingParams) -> common_pb2.TokenChoice:
    pb = common_pb2.TokenChoice()
    _choice_into(pb, p)
    return pb


def _choice_into(pb: Any, p: SamplingParams) -> None:
    """The token-choice fields, which SamplingParams and TokenChoice number alike."""
    pb.temperature, pb.top_p, pb.top_k, pb.min_p = p.temperature, p.top_p, p.top_k, p.min_p
    pb.repetition_penalty, pb.presence_penalty, pb.frequency_penalty = (
        p.repetition_penalty, p.presence_penalty, p.frequency_penalty)
    pb.logit_bias.update(p.logit_bias or {})
    for f in ("seed", "logprobs", "prompt_logprobs"):
        if getattr(p, f) is not None:
            setattr(pb, f, getattr(p, f))


def spec_stats_to_pb(m: SpecMetrics) -> common_pb2.SpecStats:
    return common_pb2.SpecStats(
        drafted_tokens=m.num_drafted_tokens, accepted_tokens=m.num_accepted_tokens, rounds=m.num_rounds,
        pipelined_rounds=m.num_pipelined_rounds, acceptance_rate=m.acceptance_rate,
        mean_accepted_length=m.mean_accepted_length, draft_ns=m.draft_ns, verify_ns=m.verify_ns,
        overhead_ns=m.overhead_ns, draft_fallback=m.draft_fallback, emitted_tokens=m.num_emitted_tokens,
        failovers=m.num_failovers, preemptions=m.num_preemptions, drafted_ahead_rounds=m.num_drafted_ahead_rounds,
    )


def spec_stats_from_pb(pb: common_pb2.SpecStats) -> SpecMetrics:
    return SpecMetrics(
        num_drafted_tokens=pb.drafted_tokens, num_accepted_tokens=pb.accepted_tokens, num_rounds=pb.rounds,
        num_emitted_tokens=pb.emitted_tokens, num_pipelined_rounds=pb.pipelined_rounds, draft_ns=pb.draft_ns,
        verify_ns=pb.verify_ns, overhead_ns=pb.overhead_ns, num_failovers=pb.failovers,
        num_preemptions=pb.preemptions, draft_fallback=pb.draft_fallback,
        num_drafted_ahead_rounds=pb.drafted_ahead_rounds,
    )


def verify_result_from_pb(pb: target_pb2.VerifyResult, seq_id: int, block: list[int]) -> VerifyResult:
    """A target replica's verdict on `block`, with the emitted tokens spelled out."""
    emitted = list(block[: pb.num_accepted]) + [pb.next_token]
    return VerifyResult(seq_id, pb.num_accepted, emitted, logprobs_from_pb(list(pb.logprobs), emitted), pb.verify_ns)


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
        check_token_ids(d.ids, vocab_size, f"q[{j}]")
        t_ids = torch.tensor(list(d.ids), dtype=torch.int64)
        t_p = torch.tensor(list(d.probs), dtype=torch.float32)
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
