"""Typed configuration of the target service (built by `specsplit target`)."""

from __future__ import annotations

from dataclasses import dataclass

from specsplit.serving.tls import ClientTLS, ServerTLS


@dataclass(frozen=True)
class TargetServiceConfig:
    model: str  # target model: folder, GGUF, hub id or catalogue name
    host: str = "0.0.0.0"  # interface to bind
    grpc_port: int = 50052  # sessions from the gateway
    metrics_port: int = 9100  # Prometheus /metrics; 0 = off
    dtype: str = "auto"  # float32 on CPU, the checkpoint's 16-bit type on GPU
    tensor_parallel_size: int = 1  # GPUs the target is sharded over
    max_model_len: int | None = None  # context limit; default: the model's
    gpu_memory_utilization: float = 0.9  # share of GPU memory for weights + KV cache
    kv_cache_memory_bytes: int | None = None  # explicit KV budget (CPU default 2 GiB)
    max_batch: int = 64  # sessions verified in one forward at most
    shutdown_grace_seconds: float = 30.0  # SIGTERM: time for in-flight rounds to finish
    enforce_eager: bool = False  # skip CUDA graph capture (debugging, or to save memory)
    tls_cert: str | None = None  # PEM certificate chain: serve TLS (plaintext without it)
    tls_key: str | None = None  # PEM private key of tls_cert
    tls_client_ca: str | None = None  # PEM CA: require client certificates it signed (mTLS)
    health_port: int | None = None  # plaintext grpc.health.v1-only port for kubelet probes
    # direct rounds (target_service/generate.py): this tier dials the draft replicas itself
    draft_tls_ca: str | None = None  # dial draft replicas over TLS, trusting this CA
    draft_tls_cert: str | None = None  # client certificate for draft replicas that require mTLS
    draft_tls_key: str | None = None  # its private key
    draft_tls_server_name: str | None = None  # name the draft replicas' certificates carry
    round_timeout_s: float = 30.0  # a draft round slower than this counts as a failed draft replica

    def __post_init__(self) -> None:
        ServerTLS.from_flags(self.tls_cert, self.tls_key, self.tls_client_ca)  # fail early
        if not 0 <= self.grpc_port < 65536 or not 0 <= self.metrics_port < 65536:
            raise ValueError("ports must be in 0..65535")
        if not 0.05 <= self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in [0.05, 1.0]")
        if self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be >= 1")

    @property
    def draft_tls(self) -> ClientTLS | None:
        """How to dial draft replicas in direct rounds; None: plaintext."""
        return ClientTLS.from_flags(self.draft_tls_ca, self.draft_tls_cert, self.draft_tls_key,
                                    self.draft_tls_server_name)

    @property
    def tls(self) -> ServerTLS | None:
        return ServerTLS.from_flags(self.tls_cert, self.tls_key, self.tls_client_ca)
