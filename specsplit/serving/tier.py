"""Lifecycle shared by the draft and target services: serve, warm up, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

import grpc

from specsplit.serving.batcher import StepBatcher
from specsplit.serving.grpc_server import GrpcServer, start_grpc_server, wait_for_signal
from specsplit.serving.metrics import TierMetrics, serve_metrics
from specsplit.serving.tls import ServerTLS

log = logging.getLogger(__name__)


@dataclass
class TierHandle:
    """A running tier: what tests and the `up` command need to reach and stop it."""

    grpc: GrpcServer
    batcher: StepBatcher
    metrics: TierMetrics
    metrics_port: int = 0
    metrics_server: WSGIServer | None = None  # the /metrics HTTP server (its own thread); None: off
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    on_stop: list[Callable[[], None]] = field(default_factory=list)  # e.g. stop TP workers
    on_close: list[Callable[[], Awaitable[None]]] = field(default_factory=list)  # e.g. close client channels

    @property
    def port(self) -> int:
        return self.grpc.port

    async def shutdown(self, grace_s: float) -> None:
        try:
            await self.grpc.shutdown(grace_s)
            for close in self.on_close:
                await close()
            await self.batcher.stop()
            for fn in self.on_stop:
                fn()
        finally:  # last, and even after a failed step: the metrics stay readable while the tier drains
            if self.metrics_server is not None:
                await asyncio.to_thread(_close_metrics, self.metrics_server)
                self.metrics_server = None


def _close_metrics(server: WSGIServer) -> None:
    """Stop the /metrics thread and close its socket: the port is free again (connect refused)."""
    server.shutdown()
    server.server_close()


async def start_tier(
    *, name: str, add_servicer: Callable[[grpc.aio.Server], None], service_name: str,
    batcher: StepBatcher, metrics: TierMetrics, host: str, port: int, metrics_port: int,
    warmup: Callable[[], Awaitable[None]] | None = None, tls: ServerTLS | None = None,
    health_port: int | None = None,
) -> TierHandle:
    batcher.start()
    srv = metrics_server = None
    try:
        srv = await start_grpc_server(add_servicer, [service_name], host=host, port=port, tls=tls,
                                      health_port=health_port)
        mport = 0
        if metrics_port:
            metrics_server, _ = serve_metrics(metrics.registry, host, metrics_port)
            mport = metrics_server.server_port
            log.info("%s metrics on http://%s:%d/metrics", name, host, mport)
        if warmup is not None:
            await warmup()
    except BaseException:  # a tier that fails to start leaves nothing running behind it
        if srv is not None:
            await srv.shutdown(0.0)
        if metrics_server is not None:
            _close_metrics(metrics_server)
        await batcher.stop()
        raise
    await srv.set_serving(True)
    log.info("%s ready on port %d", name, srv.port)
    return TierHandle(srv, batcher, metrics, mport, metrics_server)


async def serve_forever(handle: TierHandle, grace_s: float) -> None:
    """Run until SIGTERM/SIGINT, then report NOT_SERVING and drain within `grace_s`."""
    await wait_for_signal(handle.stop_event)
    log.info("shutting down: NOT_SERVING, draining for up to %.0fs", grace_s)
    await handle.shutdown(grace_s)


def run_tier(start: Callable[[], Awaitable[TierHandle]], grace_s: float) -> int:
    """The body of `specsplit target|draft`: start the tier, serve until SIGTERM, drain."""

    async def main() -> None:
        await serve_forever(await start(), grace_s)

    asyncio.run(main())
    return 0
