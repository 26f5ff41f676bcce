"""The configuration every session tier (draft, target) shares: bind, TLS, batch, memory.

Each tier's own config subclasses `TierConfig` and adds only what differs (the draft's
speculative config, the target's tensor parallel size, each tier's default port), so a
check written here holds for both tiers.
"""

from __future__ import annotations

import argparse
from dataclasses import KW_ONLY, dataclass, fields
from typing import Any

from specsplit.serving.tls import ServerTLS


@dataclass(frozen=True)
class TierConfig:
    model: str  # target model: folder, GGUF, hub id or catalogue name
    _: KW_ONLY
    host: str = "0.0.0.0"  # interface to bind
    grpc_port: int = 0  # sessions from the gateway (each tier sets its default)
    metrics_port: int = 9100  # Prometheus /metrics; 0 = off
    dtype: str = "auto"  # float32 on CPU, the checkpoint's 16-bit type on GPU
    max_model_len: int | None = None  # context limit; default: the model's
    gpu_memory_utilization: float = 0.9  # share of GPU memory for weights + KV cache
    kv_cache_memory_bytes: int | None = None  # explicit KV budget (CPU default 2 GiB)
    max_batch: int = 64  # sessions served by one batched forward at most
    step_gather: float = 0.25  # wait for the last step's prompt sessions: this share of a step at most
    shutdown_grace_seconds: float = 30.0  # SIGTERM: time for in-flight rounds to finish
    enforce_eager: bool = False  # skip CUDA graph capture (debugging, or to save memory)
    tls_cert: str | None = None  # PEM certificate chain: serve TLS (plaintext without it)
    tls_key: str | None = None  # PEM private key of tls_cert
    tls_client_ca: str | None = None  # PEM CA: require client certificates it signed (mTLS)
    health_port: int | None = None  # plaintext grpc.health.v1-only port for kubelet probes

    def __post_init__(self) -> None:
        ServerTLS.from_flags(self.tls_cert, self.tls_key, self.tls_client_ca)  # fail early
        if not 0 <= self.grpc_port < 65536 or not 0 <= self.metrics_port < 65536:
            raise ValueError("ports must be in 0..65535")
        if not 0.05 <= self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in [0.05, 1.0]")
        if self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if not 0.0 <= self.step_gather <= 1.0:
            raise ValueError("step_gather must be in [0, 1] (a share of one step's time)")

    @classmethod
    def from_args(cls, a: argparse.Namespace, **given: Any) -> Any:
        """Built from the `specsplit <tier>` flags, which are named after the fields."""
        kw = {f.name: getattr(a, f.name) for f in fields(cls) if f.init and hasattr(a, f.name)}
        return cls(**{**kw, **given})

    @property
    def tls(self) -> ServerTLS | None:
        return ServerTLS.from_flags(self.tls_cert, self.tls_key, self.tls_client_ca)
