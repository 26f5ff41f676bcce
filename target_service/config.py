"""Typed configuration of the target service (built by `specsplit target`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from specsplit.serving.config import TierConfig
from specsplit.serving.tls import ClientTLS


@dataclass(frozen=True)
class TargetServiceConfig(TierConfig):
    grpc_port: int = field(default=50052, kw_only=True)
    tensor_parallel_size: int = field(default=1, kw_only=True)  # GPUs the target is sharded over
    # direct rounds (target_service/generate.py): this tier dials the draft replicas itself
    draft_tls_ca: str | None = field(default=None, kw_only=True)  # dial draft replicas over TLS, trusting this CA
    draft_tls_cert: str | None = field(default=None, kw_only=True)  # client certificate for draft replicas (mTLS)
    draft_tls_key: str | None = field(default=None, kw_only=True)  # its private key
    draft_tls_server_name: str | None = field(default=None, kw_only=True)  # name the draft replicas' certificates carry
    round_timeout_s: float = field(default=30.0, kw_only=True)  # a slower draft round counts as a failed draft replica

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be >= 1")
        self.draft_tls  # noqa: B018 - fail early on a certificate without its key

    @property
    def draft_tls(self) -> ClientTLS | None:
        """How to dial draft replicas in direct rounds; None: plaintext."""
        return ClientTLS.from_flags(self.draft_tls_ca, self.draft_tls_cert, self.draft_tls_key,
                                    self.draft_tls_server_name)
