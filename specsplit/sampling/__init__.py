"""Sampling parameters, logits processing and the rejection sampler that verifies drafts."""

from specsplit.sampling.logits import (
    SamplingBatch,
    extend_seen_with_drafts,
    logprobs_of,
    make_generator,
    process_logits,
    sample,
    sample_sparse,
    seen_mask,
    topk_truncate,
)
from specsplit.sampling.params import SamplingParams
from specsplit.sampling.rejection import rejection_sample

__all__ = [
    "SamplingBatch",
    "SamplingParams",
    "extend_seen_with_drafts",
    "logprobs_of",
    "make_generator",
    "process_logits",
    "rejection_sample",
    "sample",
    "sample_sparse",
    "seen_mask",
    "topk_truncate",
]
