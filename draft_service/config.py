"""Typed configuration of the draft service (built by `specsplit draft`): what differs from a tier's."""

from __future__ import annotations

from dataclasses import dataclass, field

from specsplit.config import SpeculativeConfig
from specsplit.serving.config import TierConfig
from specsplit.speculation.branches import check_branch_alternatives


@dataclass(frozen=True)
class DraftServiceConfig(TierConfig):
    # `model` (inherited) is the target model: its tokenizer is the vocabulary the draft must share,
    # and an EAGLE head reads its embeddings (and EAGLE-1 its LM head) from its checkpoint
    speculative: SpeculativeConfig  # method (draft_model / ngram / eagle / eagle3) and the draft model or head
    grpc_port: int = field(default=50053, kw_only=True)
    # runner-up candidates per drafted token that the tree of guesses may branch on (top-m, m = 1 +
    # this): each adds one branch row per block position to the pipelined pass; 0: only the
    # all-accepted guess, as before the tree. None: 1 on a GPU, where the rows of one step cost
    # about what one row does, and 0 on a CPU, where each row costs about as much as the session's
    branch_alternatives: int | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_branch_alternatives(self.branch_alternatives)
