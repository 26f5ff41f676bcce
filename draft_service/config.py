"""Typed configuration of the draft service (built by `specsplit draft`)."""

from __future__ import annotations

from dataclasses import dataclass

from specsplit.config import SpeculativeConfig
from specsplit.serving.tls import ServerTLS


@dataclass(frozen=True)
class DraftServiceConfig:
    model: str  # the target model: its tokenizer is the vocabulary the draft must share
    speculative: SpeculativeConfig  # method (draft_model / ngram) and the draft model
    host: str = "0.0.0.0"  # interface to bind
    grpc_port: int = 50053  # sessions from the gateway
    metrics_port: int = 9100  # Prometheus /metrics; 0 = off
    dtype: str = "auto"  # float32 on CPU, 16-bit on GPU
    max_model_len: int | None = None  # context limit; default: the draft model's
    gpu_memory_utilization: float = 0.9  # share of GPU memory for the draft's weights + KV
    kv_cache_memory_bytes: int | None = None  # explicit KV budget (CPU default 2 GiB)
    max_batch: int = 64  # sessions drafted in one forward at most
    shutdown_grace_seconds: float = 30.0  # SIGTERM: time for in-flight rounds to finish
    tls_cert: str | None = None  # PEM certificate chain: serve TLS (plaintext without it)
    tls_key: str | None = None  # PEM private key of tls_cert
    tls_client_ca: str | None = None  # PEM CA: require client certificates it signed (mTLS)
    health_port: int | None = None  # plaintext grpc.health.v1-only port for kubelet probes

    def __post_init__(self) -> None:
        ServerTLS.from_flags(self.tls_cert, self.tls_key, self.tls_client_ca)  # fail early
        if not 0 <= self.grpc_port < 65536 or not 0 <= self.metrics_port < 65536:
            raise ValueError("ports must be in 0..65535")
        if self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")

    @property
    def tls(self) -> ServerTLS | None:
        return ServerTLS.from_flags(self.tls_cert, self.tls_key, self.tls_client_ca)
