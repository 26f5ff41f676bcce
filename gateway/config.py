"""Typed configuration of the gateway (built by `specsplit gateway`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from specsplit.config import SpeculativeConfig

DISCOVERY_MODES = ("static", "dns", "kubernetes")


@dataclass(frozen=True)
class GatewayConfig:
    model: str  # target model: the gateway loads only its tokenizer and config
    speculative: SpeculativeConfig | None = None  # None: plain decoding on the target tier
    served_model_name: str | None = None  # name clients pass as `model`; default: MODEL as given
    host: str = "0.0.0.0"  # interface for HTTP and gRPC
    port: int = 8000  # OpenAI-compatible HTTP API and /metrics
    grpc_port: int = 50051  # public gRPC API
    discovery: str = "static"  # static | dns | kubernetes: how replicas are found
    draft_addresses: tuple[str, ...] = ()  # static mode: host:port of each draft replica
    target_addresses: tuple[str, ...] = ()  # static mode: host:port of each target replica
    draft_service: str | None = None  # dns/kubernetes: Service name of the draft tier
    target_service: str | None = None  # dns/kubernetes: Service name of the target tier
    namespace: str | None = None  # kubernetes: namespace of those Services
    draft_port: int = 50053  # dns mode: port of draft replicas
    target_port: int = 50052  # dns mode: port of target replicas
    max_concurrent_requests: int = 256  # completions running at once
    max_queued_requests: int = 1024  # beyond this, RESOURCE_EXHAUSTED / HTTP 429
    max_prompt_tokens: int | None = None  # default: the model's context minus one
    max_tokens_limit: int = 8192  # largest max_tokens a request may ask for
    pipeline: bool = True  # draft block i+1 while block i is verified
    round_timeout_s: float = 30.0  # a round slower than this counts as a failed replica
    request_timeout_s: float = 600.0  # deadline of a request without a client deadline
    shutdown_grace_seconds: float = 30.0  # SIGTERM: time for in-flight requests to finish
    extra: dict = field(default_factory=dict)  # reserved for forward-compatible options

    def __post_init__(self) -> None:
        if self.discovery not in DISCOVERY_MODES:
            raise ValueError(f"discovery must be one of {DISCOVERY_MODES}, got {self.discovery!r}")
        if self.discovery == "static" and not self.target_addresses:
            raise ValueError("static discovery needs --target-addresses")
        if self.discovery == "static" and self.speculative is not None and not self.draft_addresses:
            raise ValueError("static discovery with a speculative config needs --draft-addresses")
        if self.discovery != "static" and not self.target_service:
            raise ValueError(f"{self.discovery} discovery needs --target-service")
        if self.max_concurrent_requests < 1 or self.max_queued_requests < 0:
            raise ValueError("max_concurrent_requests must be >= 1 and max_queued_requests >= 0")
