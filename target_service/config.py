"""Typed configuration of the target service (built by `specsplit target`): what differs from a tier's."""

from __future__ import annotations

from dataclasses import dataclass, field

from specsplit.serving.config import TierConfig


@dataclass(frozen=True)
class TargetServiceConfig(TierConfig):
    grpc_port: int = field(default=50052, kw_only=True)
    tensor_parallel_size: int = field(default=1, kw_only=True)  # GPUs the target is sharded over

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be >= 1")
