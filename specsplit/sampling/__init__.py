"""Sampling parameters, logits processing and the rejection sampler that verifies drafts."""

from specsplit.sampling.history import (
    extend_counts_with_drafts,
    extend_seen_with_drafts,
    output_counts,
    seen_mask,
)
from specsplit.sampling.logits import (
    SamplingBatch,
    logprobs_of,
    make_generator,
    pick_logprobs,
    process_logits,
    processed_logprobs,
    sample,
    sample_sparse,
    topk_truncate,
)
from specsplit.sampling.params import SamplingParams
from specsplit.sampling.rejection import rejection_sample

__all__ = [
    "SamplingBatch",
    "SamplingParams",
    "extend_counts_with_drafts",
    "extend_seen_with_drafts",
    "logprobs_of",
    "make_generator",
    "output_counts",
    "pick_logprobs",
    "process_logits",
    "processed_logprobs",
    "rejection_sample",
    "sample",
    "sample_sparse",
    "seen_mask",
    "topk_truncate",
]
