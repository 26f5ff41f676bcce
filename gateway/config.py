"""Typed configuration of the gateway (built by `specsplit gateway`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.discovery import dns_name
from specsplit.config import SpeculativeConfig
from specsplit.serving.tls import ClientTLS, ServerTLS
from specsplit.speculation.branches import check_max_branches

DISCOVERY_MODES = ("static", "dns", "kubernetes")


@dataclass(frozen=True)
class GatewayConfig:
    model: str  # target model: the gateway loads only its tokenizer and config
    speculative: SpeculativeConfig | None = None  # None: plain decoding on the target tier
    # names clients pass as `model` (vLLM's --served-model-name; the first is the one reported in
    # responses); a string is one name; default: MODEL exactly as the user gave it
    served_model_name: tuple[str, ...] | str | None = None
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
    # the tree of guesses: at most this many outcomes of a verify drafted ahead for (the draft's
    # likeliest; 1 = only the all-accepted guess); 0 = every outcome the draft guesses, up to 64
    max_branches: int = 0
    # direct: the target tier drives the rounds and streams to the draft tier itself (one network
    # hop per round instead of four through the gateway); gateway: the gateway drives them
    round_mode: str = "direct"
    round_timeout_s: float = 30.0  # a round with no answer nor progress report for this long: failed replica
    kv_wait_s: float = 30.0  # how long a session waits for KV memory on the target tier before 429
    request_timeout_s: float = 600.0  # deadline of a request without a client deadline
    shutdown_grace_seconds: float = 30.0  # SIGTERM: time for in-flight requests to finish
    # security (docs/kubernetes.md): API keys on the public APIs, TLS on every hop
    api_key_file: str | None = None  # one key per line (gateway/auth.py); None: no keys needed
    api_key_max_concurrent: int = 0  # default per-key limit of running requests; 0 = none
    api_key_tokens_per_minute: int = 0  # default per-key limit of tokens per minute; 0 = none
    tls_cert: str | None = None  # serve the public gRPC and HTTP ports over TLS with this cert
    tls_key: str | None = None  # its private key
    tls_client_ca: str | None = None  # public mutual TLS: require client certs this CA signed
    tier_tls_ca: str | None = None  # dial draft/target replicas over TLS, trusting this CA
    tier_tls_cert: str | None = None  # client certificate for tiers that require mutual TLS
    tier_tls_key: str | None = None  # its private key
    tier_tls_server_name: str | None = None  # name the tiers' certificates carry (default: see tier_tls)
    extra: dict = field(default_factory=dict)  # reserved for forward-compatible options

    def __post_init__(self) -> None:
        if self.round_mode not in ("direct", "gateway"):
            raise ValueError(f"round_mode must be 'direct' or 'gateway', got {self.round_mode!r}")
        names = self.served_model_name
        names = (names,) if isinstance(names, str) else tuple(names or ())
        if any(not isinstance(n, str) or not n.strip() for n in names):
            raise ValueError(f"served model names must be non-empty strings, got {names!r}")
        object.__setattr__(self, "served_model_name", names or None)
        if self.discovery not in DISCOVERY_MODES:
            raise ValueError(f"discovery must be one of {DISCOVERY_MODES}, got {self.discovery!r}")
        if self.discovery == "static" and not self.target_addresses:
            raise ValueError("static discovery needs --target-addresses")
        if self.discovery == "static" and self.speculative is not None and not self.draft_addresses:
            raise ValueError("static discovery with a speculative config needs --draft-addresses")
        if self.discovery != "static" and not self.target_service:
            raise ValueError(f"{self.discovery} discovery needs --target-service")
        ServerTLS.from_flags(self.tls_cert, self.tls_key, self.tls_client_ca)  # fail early on half a pair
        self.tier_tls("target")
        if self.api_key_max_concurrent < 0 or self.api_key_tokens_per_minute < 0:
            raise ValueError("API key limits must be >= 0 (0 = unlimited)")
        check_max_branches(self.max_branches)
        if self.max_concurrent_requests < 1 or self.max_queued_requests < 0:
            raise ValueError("max_concurrent_requests must be >= 1 and max_queued_requests >= 0")

    @property
    def served_model_names(self) -> tuple[str, ...]:
        """Every name the gateway answers to; the first is its primary name."""
        return self.served_model_name or (self.model,)  # type: ignore[return-value]

    @property
    def tls(self) -> ServerTLS | None:
        """TLS of the public endpoints; None: plaintext."""
        return ServerTLS.from_flags(self.tls_cert, self.tls_key, self.tls_client_ca)

    def tier_tls(self, tier: str) -> ClientTLS | None:
        """How to dial `tier` ("draft" or "target"); None: plaintext.

        Replicas are dialled by IP, so without --tier-tls-server-name the certificate is checked
        against the tier's Service name (`service.namespace.svc`) in dns/kubernetes discovery, and
        against the host of each static address otherwise.
        """
        service = self.target_service if tier == "target" else self.draft_service
        name = self.tier_tls_server_name
        if not name and self.discovery != "static" and service:
            name = dns_name(service, self.namespace)
        return ClientTLS.from_flags(self.tier_tls_ca, self.tier_tls_cert, self.tier_tls_key, name)
