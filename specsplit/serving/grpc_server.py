"""The server skeleton every tier shares: grpc.aio server, health, reflection, shutdown.

Follows grpc's examples: add servicers, start, report SERVING only after warm-up, and on
SIGTERM report NOT_SERVING first, then stop with a grace period so in-flight rounds finish.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 * 2**20  # a 32k-token prompt is ~130 kB packed; 16 MiB is generous


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
    ]


@dataclass
class GrpcServer:
    server: grpc.aio.Server
    health: health_aio.HealthServicer
    port: int
    service_names: tuple[str, ...]

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def shutdown(self, grace_s: float) -> None:
        """NOT_SERVING first (load balancers and the gateway stop sending), then drain."""
        await self.set_serving(False)
        await self.server.stop(grace_s)


async def start_grpc_server(
    add_servicers: Callable[[grpc.aio.Server], None], service_names: Iterable[str], *,
    host: str = "0.0.0.0", port: int = 0, max_concurrent_streams: int = 1024,
) -> GrpcServer:
    """Create, bind and start a server; health starts NOT_SERVING until `set_serving(True)`."""
    opts = [*channel_options(), ("grpc.max_concurrent_streams", max_concurrent_streams)]
    server = grpc.aio.server(options=opts)
    add_servicers(server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = tuple(service_names)
    reflection.enable_server_reflection((*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                         reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind gRPC port {host}:{port}")
    await server.start()
    srv = GrpcServer(server, health, bound, names)
    await srv.set_serving(False)
    log.info("gRPC listening on %s:%d (plaintext)", host, bound)
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
