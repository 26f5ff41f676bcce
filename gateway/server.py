"""Gateway process: public gRPC + OpenAI HTTP over GatewayCore, replicas from discovery."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from gateway.config import GatewayConfig
from gateway.core import GatewayCore
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
        await self.grpc.shutdown(grace_s)
        await self.http.cleanup()
        for d in self.discoveries:
            await d.stop()
        await self.core.close()


def _tokenizer_and_limits(model: str) -> tuple[Any, int, tuple[int, ...]]:
    from transformers import AutoConfig

    from specsplit.factory import load_tokenizer, model_folder
    from specsplit.runtime.config import ModelConfig

    folder = model_folder(model)
    cfg = ModelConfig.from_hf(AutoConfig.from_pretrained(folder))
    tok = load_tokenizer(folder)
    eos = set(cfg.eos_token_ids)
    if tok.eos_token_id is not None:
        eos.add(int(tok.eos_token_id))
    return tok, cfg.max_position_embeddings, tuple(sorted(eos))


async def start_gateway(cfg: GatewayConfig, *, max_model_len: int | None = None,
                        kube_client: Any = None) -> GatewayHandle:
    tok, model_len, eos = await asyncio.to_thread(_tokenizer_and_limits, cfg.model)
    core = GatewayCore(cfg, tok, min(max_model_len or model_len, model_len), eos)
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
    servicer = GatewayServicer(core)
    srv = await start_grpc_server(lambda s: gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, s),
                                  [SERVICE_NAME], host=cfg.host, port=cfg.grpc_port)
    runner = web.AppRunner(OpenAIApi(core).app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port)
    await site.start()
    http_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    await srv.set_serving(True)
    log.info("gateway ready: HTTP http://%s:%d/v1, gRPC %s:%d", cfg.host, http_port, cfg.host, srv.port)
    return GatewayHandle(core, srv, runner, http_port, discoveries)


async def serve_gateway_forever(handle: GatewayHandle, grace_s: float) -> None:
    await wait_for_signal(handle.stop_event)
    log.info("shutting down: NOT_SERVING, draining for up to %.0fs", grace_s)
    await handle.shutdown(grace_s)
