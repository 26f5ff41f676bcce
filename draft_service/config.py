"""Typed configuration of the draft service (built by `specsplit draft`): what differs from a tier's."""

from __future__ import annotations

from dataclasses import dataclass, field

from specsplit.config import SpeculativeConfig
from specsplit.serving.config import TierConfig


@dataclass(frozen=True)
class DraftServiceConfig(TierConfig):
    # `model` (inherited) is the target model: its tokenizer is the vocabulary the draft must share
    speculative: SpeculativeConfig  # method (draft_model / ngram) and the draft model
    grpc_port: int = field(default=50053, kw_only=True)
    # runner-up candidates per drafted token that the tree of guesses may branch on (top-m, m = 1 +
    # this): each costs one more branch row per block position in the pipelined pass; 0: only the
    # all-accepted guess, as before the tree
    branch_alternatives: int = field(default=1, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.branch_alternatives <= 8:
            raise ValueError(f"branch_alternatives must be in 0..8, got {self.branch_alternatives}")
