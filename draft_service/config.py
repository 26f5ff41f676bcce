"""Typed configuration of the draft service (built by `specsplit draft`): what differs from a tier's."""

from __future__ import annotations

from dataclasses import dataclass, field

from specsplit.config import SpeculativeConfig
from specsplit.serving.config import TierConfig


@dataclass(frozen=True)
class DraftServiceConfig(TierConfig):
    # `model` (inherited) is the target model: its tokenizer is the vocabulary the draft must share,
    # and an EAGLE head reads its embeddings (and EAGLE-1 its LM head) from its checkpoint
    speculative: SpeculativeConfig  # method (draft_model / ngram / eagle / eagle3) and the draft model or head
    grpc_port: int = field(default=50053, kw_only=True)
