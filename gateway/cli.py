"""`specsplit gateway`: build the config from the flags and serve until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio

from gateway.config import GatewayConfig
from gateway.server import serve_gateway_forever, start_gateway
from specsplit.config import SpeculativeConfig


def _addresses(s: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in s.split(",") if a.strip())


def config_from_args(a: argparse.Namespace) -> GatewayConfig:
    """The gateway's config from its `specsplit gateway` flags."""
    return GatewayConfig(
        model=a.model, speculative=SpeculativeConfig.from_any(a.speculative_config),
        served_model_name=tuple(a.served_model_name or ()), host=a.host, port=a.port, grpc_port=a.grpc_port,
        discovery=a.discovery, draft_addresses=_addresses(a.draft_addresses),
        target_addresses=_addresses(a.target_addresses), draft_service=a.draft_service,
        target_service=a.target_service, namespace=a.namespace, draft_port=a.draft_port,
        target_port=a.target_port, max_concurrent_requests=a.max_concurrent_requests,
        max_queued_requests=a.max_queued_requests, pipeline=not a.no_pipeline, max_branches=a.max_branches,
        round_mode=a.round,
        shutdown_grace_seconds=a.shutdown_grace_seconds, max_prompt_tokens=a.max_prompt_tokens,
        max_tokens_limit=a.max_tokens_limit, round_timeout_s=a.round_timeout, request_timeout_s=a.request_timeout,
        kv_wait_s=a.kv_wait, api_key_file=a.api_key_file,
        api_key_max_concurrent=a.api_key_max_concurrent, api_key_tokens_per_minute=a.api_key_tokens_per_minute,
        tls_cert=a.tls_cert, tls_key=a.tls_key, tls_client_ca=a.tls_client_ca, tier_tls_ca=a.tier_tls_ca,
        tier_tls_cert=a.tier_tls_cert, tier_tls_key=a.tier_tls_key, tier_tls_server_name=a.tier_tls_server_name,
    )


def run(a: argparse.Namespace) -> int:
    cfg = config_from_args(a)

    async def main() -> None:
        h = await start_gateway(cfg, max_model_len=a.max_model_len)
        await serve_gateway_forever(h, cfg.shutdown_grace_seconds)

    asyncio.run(main())
    return 0
