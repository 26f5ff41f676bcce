"""The server skeleton every tier shares: grpc.aio server, health, reflection, shutdown.

Follows grpc's examples: add servicers, start, report SERVING only after warm-up, and on
SIGTERM report NOT_SERVING first, refuse new calls, let those in flight finish within a grace
period and hand back the rest (drain.py), then stop, so the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from specsplit.serving.drain import Drain
from specsplit.serving.malformed import RejectMalformed
from specsplit.serving.tls import ServerTLS, add_port

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 * 2**20  # a 32k-token prompt is ~130 kB packed; 16 MiB is generous
HAND_BACK_WAIT_S = 2.0  # after the grace period: time for handed-back calls to send their status


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Shared by servers and clients: message limits and keepalive that detects dead peers."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        # a restarted replica is reached again within ~1 s (gRPC's default backoff grows to 120 s)
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1_000),
        ("grpc.min_reconnect_backoff_ms", 5_000),  # = connect timeout: lets a lossy link connect
    ]


class HealthServicer(health_aio.HealthServicer):
    """grpc's health servicer, whose NOT_FOUND says which services it knows (grpc's is empty)."""

    async def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
                    ) -> health_pb2.HealthCheckResponse:
        known = getattr(self, "_server_status", None)
        if known is not None and request.service not in known:
            names = ", ".join(repr(n) for n in sorted(known))
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"unknown service {request.service!r}; this server reports health for {names} "
                                "('' is the server as a whole)")
        return await super().Check(request, context)


@dataclass
class GrpcServer:
    server: grpc.aio.Server
    health: HealthServicer
    port: int
    service_names: tuple[str, ...]
    health_server: grpc.aio.Server | None = None  # plaintext health-only port (kubelet probes)
    health_port: int = 0
    drain: Drain = field(default_factory=Drain)  # the server's interceptor: in-flight calls, refusals

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def begin_drain(self) -> None:
        """NOT_SERVING for good (probes, load balancers and the gateway stop sending), and new
        calls get UNAVAILABLE; health checks and calls in flight go on."""
        await self.set_serving(False)
        await self.health.enter_graceful_shutdown()  # nothing may report SERVING again
        self.drain.begin()

    async def finish(self, grace_s: float) -> None:
        """Let calls in flight finish within `grace_s`, hand back the rest, then stop."""
        if not await self.drain.wait_idle(grace_s):
            self.drain.hand_back()
            await self.drain.wait_idle(HAND_BACK_WAIT_S)
        await self.server.stop(min(grace_s, 1.0))
        if self.health_server is not None:
            await self.health_server.stop(0)

    async def shutdown(self, grace_s: float) -> None:
        """SIGTERM as Kubernetes expects: NOT_SERVING, no new calls, drain or hand back, stop."""
        await self.begin_drain()
        await self.finish(grace_s)


async def start_grpc_server(
    add_servicers: Callable[[grpc.aio.Server], None], service_names: Iterable[str], *,
    host: str = "0.0.0.0", port: int = 0, max_concurrent_streams: int = 1024,
    tls: ServerTLS | None = None, health_port: int | None = None,
) -> GrpcServer:
    """Create, bind and start a server; health starts NOT_SERVING until `set_serving(True)`.

    With `tls` the port serves TLS (mutual TLS with a client CA). Kubernetes' native gRPC
    probes cannot speak TLS, so `health_port` (0 = any free port) adds a plaintext port that
    serves nothing but grpc.health.v1.
    """
    opts = [*channel_options(), ("grpc.max_concurrent_streams", max_concurrent_streams)]
    drain = Drain()
    # undecodable: INVALID_ARGUMENT; while shutting down: UNAVAILABLE
    server = grpc.aio.server(options=opts, interceptors=[RejectMalformed(), drain])
    add_servicers(server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = tuple(service_names)
    reflection.enable_server_reflection((*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                         reflection.SERVICE_NAME), server)
    bound = add_port(server, host, port, tls)
    if bound == 0:
        raise OSError(f"could not bind gRPC port {host}:{port}")
    await server.start()
    srv = GrpcServer(server, health, bound, names, drain=drain)
    if health_port is not None:
        hs = grpc.aio.server(options=[("grpc.max_concurrent_streams", 16)])
        health_pb2_grpc.add_HealthServicer_to_server(health, hs)
        srv.health_port = hs.add_insecure_port(f"{host}:{health_port}")
        if srv.health_port == 0:
            raise OSError(f"could not bind the health port {host}:{health_port}")
        await hs.start()
        srv.health_server = hs
        log.info("grpc.health.v1 (only) on plaintext port %s:%d", host, srv.health_port)
    await srv.set_serving(False)
    log.info("gRPC listening on %s:%d (%s)", host, bound, "TLS" if tls else "plaintext")
    return srv


async def wait_for_signal(stop: asyncio.Event | None = None) -> None:
    """Block until SIGTERM/SIGINT (or `stop` is set)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    await stop.wait()
