"""grpc.health.v1 and reflection on all three servers; graceful shutdown says NOT_SERVING first."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from draft_service.config import DraftServiceConfig
from draft_service.server import start_draft
from gateway.config import GatewayConfig
from gateway.server import start_gateway
from specsplit.proto.v1 import gateway_pb2, gateway_pb2_grpc, target_pb2, target_pb2_grpc
from target_service.config import TargetServiceConfig
from target_service.server import start_target
from tests.services.conftest import (
    KV_BYTES,
    Cluster,
    LoopThread,
    Reference,
    TinyModels,
    greedy_choice_pb,
    greedy_pb,
    spec_config,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICES = {"gateway": "specsplit.v1.Gateway", "target": "specsplit.v1.TargetService",
            "draft_model": "specsplit.v1.DraftService", "ngram": "specsplit.v1.DraftService"}


def _address(cluster: Cluster, tier: str) -> str:
    if tier == "gateway":
        return f"127.0.0.1:{cluster.gateway('draft_model').port}"
    handle = cluster.target if tier == "target" else cluster.drafts[tier]
    return f"127.0.0.1:{handle.port}"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("tier", sorted(SERVICES))
def test_health_reports_serving(cluster: Cluster, tier: str) -> None:
    with grpc.insecure_channel(_address(cluster, tier)) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", SERVICES[tier]):
            assert stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == SERVING
        with pytest.raises(grpc.RpcError) as e:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert "unknown service 'no.such.Service'" in e.value.details() and SERVICES[tier] in e.value.details()


def _reflect(address: str, requests: list[reflection_pb2.ServerReflectionRequest]
             ) -> list[reflection_pb2.ServerReflectionResponse]:
    with grpc.insecure_channel(address) as ch:
        return list(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(iter(requests), timeout=5))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("tier", sorted(SERVICES))
def test_reflection_lists_and_describes_the_services(cluster: Cluster, tier: str) -> None:
    service = SERVICES[tier]
    listed, described = _reflect(_address(cluster, tier), [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=service),
    ])
    names = {s.name for s in listed.list_services_response.service}
    assert names == {service, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in described.file_descriptor_response.file_descriptor_proto]
    assert any(f.package == "specsplit.v1" and service.rsplit(".", 1)[1] in [s.name for s in f.service]
               for f in files), "reflection cannot describe the service (grpcurl could not call it)"


def _watch(address: str) -> tuple[grpc.Channel, Iterator[health_pb2.HealthCheckResponse]]:
    ch = grpc.insecure_channel(address)
    return ch, health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tier", ["target", "draft"])
def test_tier_shutdown_reports_not_serving_then_drains(aio: LoopThread, models: TinyModels, tier: str) -> None:
    if tier == "target":
        handle = aio.run(start_target(TargetServiceConfig(str(models.target), host="127.0.0.1", grpc_port=0,
                                                          metrics_port=0, kv_cache_memory_bytes=KV_BYTES)))
    else:
        handle = aio.run(start_draft(DraftServiceConfig(str(models.target), spec_config("ngram", models),
                                                        host="127.0.0.1", grpc_port=0, metrics_port=0)))
    address = f"127.0.0.1:{handle.port}"
    ch, watch = _watch(address)
    requests: queue.Queue[Any] = queue.Queue()
    session: Any = None
    if tier == "target":  # an in-flight session keeps working during the grace period
        session = target_pb2_grpc.TargetServiceStub(ch).Session(iter(requests.get, None), timeout=30)
        requests.put(target_pb2.TargetClientMessage(open=target_pb2.TargetOpen(token_ids=[1, 2, 3],
                                                                                params=greedy_choice_pb())))
        requests.put(target_pb2.TargetClientMessage(verify=target_pb2.TargetVerify(round_id=1)))
        assert next(session).result.round_id == 1
    assert next(watch).status == SERVING
    stopping = asyncio.run_coroutine_threadsafe(handle.shutdown(5.0), aio.loop)
    assert next(watch).status == NOT_SERVING  # first, while the server still answers
    if session is not None:
        requests.put(target_pb2.TargetClientMessage(verify=target_pb2.TargetVerify(round_id=2, draft_ids=[4])))
        assert next(session).result.round_id == 2
        requests.put(None)  # the client closes its session; the server may now stop
        assert list(session) == []
    watch.cancel()
    stopping.result(15)
    with pytest.raises(grpc.RpcError) as e:
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    ch.close()


@pytest.mark.timeout(60)
def test_gateway_shutdown_reports_not_serving_and_finishes_in_flight_requests(
        aio: LoopThread, cluster: Cluster, reference: Reference) -> None:
    gw = aio.run(start_gateway(GatewayConfig(
        str(cluster.models.target), spec_config("draft_model", cluster.models), host="127.0.0.1", port=0, grpc_port=0,
        target_addresses=(f"127.0.0.1:{cluster.target.port}",),
        draft_addresses=(f"127.0.0.1:{cluster.drafts['draft_model'].port}",))))
    address = f"127.0.0.1:{gw.port}"
    ch, watch = _watch(address)
    assert next(watch).status == SERVING
    call = gateway_pb2_grpc.GatewayStub(ch).Generate(
        gateway_pb2.GenerateRequest(text="def fibonacci(n):", params=greedy_pb(150)), timeout=30)
    ids = list(next(call).token_ids)
    stopping = asyncio.run_coroutine_threadsafe(gw.shutdown(20.0), aio.loop)
    assert next(watch).status == NOT_SERVING
    watch.cancel()
    with grpc.insecure_channel(address) as other:  # new requests are turned away during the drain
        with pytest.raises(grpc.RpcError) as e:
            gateway_pb2_grpc.GatewayStub(other).GenerateUnary(
                gateway_pb2.GenerateRequest(text="hi", params=greedy_pb(2)), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finished = threading.Event()
    for m in call:  # ...while the one in flight completes
        ids += m.token_ids
        if m.HasField("usage"):
            finished.set()
    assert finished.is_set() and ids == reference.greedy("def fibonacci(n):", 150).token_ids
    stopping.result(25)
    ch.close()
