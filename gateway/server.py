"""Gateway process: public gRPC + OpenAI HTTP over GatewayCore, replicas from discovery."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from gateway.auth import ApiKeys, KeyLimits
from gateway.config import GatewayConfig
from gateway.core import DRAINING, GatewayCore
from gateway.discovery import Discovery, make_discovery
from gateway.grpc_api import GatewayServicer
from gateway.http_api import OpenAIApi
from specsplit.proto.v1 import gateway_pb2, gateway_pb2_grpc
from specsplit.serving.grpc_server import GrpcServer, start_grpc_server, wait_for_signal

log = logging.getLogger(__name__)
SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name


@dataclass
class GatewayHandle:
    core: GatewayCore
    grpc: GrpcServer
    http: web.AppRunner
    http_port: int
    discoveries: list[Discovery] = field(default_factory=list)
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def port(self) -> int:
        return self.grpc.port

    async def shutdown(self, grace_s: float) -> None:
        """SIGTERM: NOT_SERVING and HTTP /health 503, new requests refused (UNAVAILABLE / 503),
        requests in flight (gRPC and HTTP) finish within `grace_s`, the rest are ended."""
        t0 = asyncio.get_running_loop().time()
        self.core.draining = True
        await self.grpc.begin_drain()
        await self.core.wait_idle(grace_s)
        await self.grpc.finish(max(0.0, grace_s - (asyncio.get_running_loop().time() - t0)))
        await self.http.cleanup()  # HTTP requests still running after the grace period are cancelled
        for d in self.discoveries:
            await d.stop()
        await self.core.close()


def _tokenizer_and_limits(model: str) -> tuple[Any, int, tuple[int, ...], int]:
    from transformers import AutoConfig

    from specsplit.factory import load_tokenizer, model_folder
    from specsplit.runtime.config import ModelConfig, with_generation_eos
    from specsplit.speculation.sequence import end_token_ids

    folder = model_folder(model)
    cfg = with_generation_eos(ModelConfig.from_hf(AutoConfig.from_pretrained(folder)), folder)
    tok = load_tokenizer(folder)
    return tok, cfg.max_position_embeddings, end_token_ids(cfg.eos_token_ids, tok), cfg.vocab_size


async def start_gateway(cfg: GatewayConfig, *, max_model_len: int | None = None,
                        kube_client: Any = None) -> GatewayHandle:
    keys = None  # first: a broken key file stops the start before anything is running
    if cfg.api_key_file:
        keys = ApiKeys(cfg.api_key_file, KeyLimits(cfg.api_key_max_concurrent, cfg.api_key_tokens_per_minute))
    else:
        log.warning("no --api-key-file: the gateway's APIs are open to anyone who can reach them")
    tok, model_len, eos, vocab = await asyncio.to_thread(_tokenizer_and_limits, cfg.model)
    sc = cfg.speculative
    layers: tuple[int, ...] = ()
    hidden = 0
    if sc is not None and sc.method in ("eagle", "eagle3"):  # the states the head reads: asked of the target tier
        from specsplit.factory import eagle_target_layers

        layers, hidden = await asyncio.to_thread(eagle_target_layers, sc, cfg.model)
    core = GatewayCore(cfg, tok, min(max_model_len or model_len, model_len), eos, model_vocab_size=vocab,
                       hidden_layers=layers, hidden_size=hidden)
    discoveries = []
    for pool, static, service, port in (
        (core.targets, cfg.target_addresses, cfg.target_service, cfg.target_port),
        (core.drafts, cfg.draft_addresses, cfg.draft_service, cfg.draft_port),
    ):
        if pool is None:
            continue
        d = make_discovery(cfg.discovery, static=list(static), service=service, namespace=cfg.namespace,
                           port=port, kube_client=kube_client)
        d.subscribe(pool.set_addresses)
        await d.start()
        pool.set_addresses(d.addresses())
        discoveries.append(d)
    if cfg.tier_tls("target") is None:
        log.warning("connections to the draft and target tiers are PLAINTEXT: --tier-tls-ca (with "
                    "--tier-tls-cert/--tier-tls-key for mutual TLS) encrypts them")
    tls = cfg.tls
    servicer = GatewayServicer(core, keys)
    srv = await start_grpc_server(lambda s: gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, s),
                                  [SERVICE_NAME], host=cfg.host, port=cfg.grpc_port, tls=tls)
    app = OpenAIApi(core, keys).app()
    app.middlewares.insert(0, _refuse_while_draining(core))
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port, ssl_context=tls.ssl_context() if tls else None)
    await site.start()
    http_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    await srv.set_serving(True)
    scheme = "https" if tls else "http"
    if tls is None:
        log.warning("HTTP on %s:%d is PLAINTEXT (no TLS): terminate TLS in front of it (Ingress) or pass "
                    "--tls-cert/--tls-key", cfg.host, http_port)
    log.info("gateway ready: HTTP %s://%s:%d/v1, gRPC %s:%d%s", scheme, cfg.host, http_port, cfg.host, srv.port,
             "" if tls else " (plaintext)")
    return GatewayHandle(core, srv, runner, http_port, discoveries)


def _refuse_while_draining(core: GatewayCore) -> Any:
    """While shutting down, /health answers 503 (the readiness probe fails, the pod leaves the
    Service) and new API calls get 503 before any work; requests in flight go on."""

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        if not core.draining or request.path == "/metrics":
            return await handler(request)
        if request.path == "/health":
            return web.json_response({"status": "shutting down"}, status=503)
        return web.json_response({"error": {"message": DRAINING, "type": "service_unavailable", "param": None,
                                            "code": 503}}, status=503)
    return middleware


async def serve_gateway_forever(handle: GatewayHandle, grace_s: float) -> None:
    await wait_for_signal(handle.stop_event)
    log.info("shutting down: NOT_SERVING, draining for up to %.0fs", grace_s)
    await handle.shutdown(grace_s)
