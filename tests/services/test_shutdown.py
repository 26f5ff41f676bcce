"""SIGTERM as Kubernetes expects, on every server: NOT_SERVING, no new sessions or requests,
those in flight finish within the grace period or are handed back (UNAVAILABLE), exit 0."""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import signal
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from gateway.config import GatewayConfig
from gateway.server import start_gateway
from specsplit.proto.v1 import gateway_pb2, gateway_pb2_grpc, target_pb2, target_pb2_grpc
from specsplit.serving.tier import TierHandle
from target_service.config import TargetServiceConfig
from target_service.server import start_target
from tests.services.conftest import (
    KV_BYTES,
    Cluster,
    LoopThread,
    ReplicaProcess,
    TinyModels,
    greedy_choice_pb,
    greedy_pb,
    health_status,
    spec_config,
)
from tests.services.test_http import http

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _target(aio: LoopThread, models: TinyModels) -> TierHandle:
    return aio.run(start_target(TargetServiceConfig(str(models.target), host="127.0.0.1", grpc_port=0, metrics_port=0,
                                                    kv_cache_memory_bytes=KV_BYTES)))


class Session:
    """One target session driven from the test thread."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.requests: queue.Queue[Any] = queue.Queue()
        self.call = target_pb2_grpc.TargetServiceStub(self.channel).Session(iter(self.requests.get, None), timeout=60)
        self.requests.put(target_pb2.TargetClientMessage(open=target_pb2.TargetOpen(token_ids=[1, 2, 3],
                                                                                    params=greedy_choice_pb())))
        self.round = 0

    def verify(self) -> target_pb2.VerifyResult:
        self.round += 1
        self.requests.put(target_pb2.TargetClientMessage(verify=target_pb2.TargetVerify(round_id=self.round)))
        return next(self.call).result

    def close(self) -> None:
        self.requests.put(None)
        self.channel.close()


@pytest.fixture
def session_factory() -> Iterator[Any]:
    made: list[Session] = []

    def make(address: str) -> Session:
        made.append(Session(address))
        return made[-1]
    yield make
    for s in made:
        s.close()


@pytest.mark.timeout(60)
def test_draining_tier_answers_not_serving_refuses_new_sessions_and_finishes_the_open_one(
        aio: LoopThread, models: TinyModels, session_factory: Any) -> None:
    handle = _target(aio, models)
    address = f"127.0.0.1:{handle.port}"
    s = session_factory(address)
    assert s.verify().round_id == 1
    stopping = asyncio.run_coroutine_threadsafe(handle.shutdown(30.0), aio.loop)
    deadline = time.monotonic() + 10
    while health_status(address) != NOT_SERVING:  # probes on the serving port still get an answer
        assert time.monotonic() < deadline
        time.sleep(0.05)
    new = session_factory(address)
    with pytest.raises(grpc.RpcError) as e:
        new.verify()
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in e.value.details()
    assert s.verify().round_id == 2  # the session in flight goes on
    s.requests.put(None)  # ...and once it ends, the server stops long before the grace period
    assert list(s.call) == []
    stopping.result(10)


@pytest.mark.timeout(60)
def test_tier_hands_back_a_session_still_open_when_the_grace_period_ends(
        aio: LoopThread, models: TinyModels, session_factory: Any) -> None:
    handle = _target(aio, models)
    s = session_factory(f"127.0.0.1:{handle.port}")
    assert s.verify().round_id == 1
    t0 = time.monotonic()
    stopping = asyncio.run_coroutine_threadsafe(handle.shutdown(1.0), aio.loop)
    with pytest.raises(grpc.RpcError) as e:
        next(s.call)  # idle between rounds: the server ends it
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
    assert "grace period" in e.value.details()
    stopping.result(10)
    assert time.monotonic() - t0 < 8


@pytest.mark.timeout(120)
def test_tier_process_exits_zero_on_sigterm_handing_back_its_session(
        models: TinyModels, tmp_path: Any, session_factory: Any) -> None:
    p = ReplicaProcess("target", [str(models.target), "--shutdown-grace-seconds", "1"], tmp_path / "target.log")
    try:
        p.wait_ready()
        s = session_factory(p.address)
        assert s.verify().round_id == 1
        p.proc.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as e:
            next(s.call)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert p.proc.wait(30) == 0, p.log_path.read_text()[-2000:]
    finally:
        p.stop()


@pytest.mark.timeout(90)
def test_draining_gateway_refuses_new_http_and_grpc_requests_and_fails_its_health(
        aio: LoopThread, cluster: Cluster) -> None:
    gw = aio.run(start_gateway(GatewayConfig(
        str(cluster.models.target), spec_config("ngram", cluster.models), host="127.0.0.1", port=0, grpc_port=0,
        target_addresses=(f"127.0.0.1:{cluster.target.port}",),
        draft_addresses=(f"127.0.0.1:{cluster.drafts['ngram'].port}",))))
    assert http(gw.http_port, "/health")[0] == 200
    ch = grpc.insecure_channel(f"127.0.0.1:{gw.port}")
    call = gateway_pb2_grpc.GatewayStub(ch).Generate(
        gateway_pb2.GenerateRequest(text="def fibonacci(n):", params=greedy_pb(200)), timeout=60)
    next(call)  # in flight
    stopping = asyncio.run_coroutine_threadsafe(gw.shutdown(30.0), aio.loop)
    deadline = time.monotonic() + 10
    while http(gw.http_port, "/health")[0] != 503:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    status, _, body = http(gw.http_port, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert status == 503 and "shutting down" in body["error"]["message"]
    with pytest.raises(grpc.RpcError) as e:
        gateway_pb2_grpc.GatewayStub(ch).GenerateUnary(gateway_pb2.GenerateRequest(text="hi", params=greedy_pb(2)),
                                                       timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in e.value.details()
    assert any(m.HasField("usage") for m in call)  # the request in flight completes
    stopping.result(20)
    ch.close()


@pytest.mark.timeout(120)
def test_a_tp_tier_that_fails_to_start_stops_its_workers_and_its_server(
        aio: LoopThread, models: TinyModels, monkeypatch: pytest.MonkeyPatch) -> None:
    """A start that fails after the TP workers are up (here its warm-up step) raises at once and
    leaves nothing behind: no worker process (which would keep the process from ever exiting),
    no listening port."""
    import multiprocessing

    from draft_service.config import DraftServiceConfig
    from draft_service.server import DraftServicer, start_draft
    from specsplit.launcher import free_port
    from tests.services.conftest import spec_config

    def broken(self: DraftServicer, seq_id: int, prompt_len: int) -> Any:
        raise ValueError("warm-up broken on purpose")

    monkeypatch.setattr(DraftServicer, "warmup_request", broken)
    spec = dataclasses.replace(spec_config("draft_model", models), draft_tensor_parallel_size=2)
    port = free_port()
    t = time.monotonic()
    with pytest.raises(ValueError, match="warm-up broken on purpose"):
        aio.run(start_draft(DraftServiceConfig(str(models.target), spec, host="127.0.0.1", grpc_port=port,
                                               metrics_port=0)), timeout=100)
    assert time.monotonic() - t < 90
    deadline = time.monotonic() + 10
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not multiprocessing.active_children(), "a TP worker outlived the failed start"
    # nobody listens there any more
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch, pytest.raises(grpc.FutureTimeoutError):
        grpc.channel_ready_future(ch).result(timeout=1)


def _refused(port: int) -> bool:
    """True when nothing listens on `port` any more (connect refused)."""
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.timeout(120)
def test_every_shutdown_closes_the_metrics_ports_of_the_tiers_and_the_gateway(
        aio: LoopThread, models: TinyModels) -> None:
    from draft_service.config import DraftServiceConfig
    from draft_service.server import start_draft
    from specsplit.launcher import free_port

    target = aio.run(start_target(TargetServiceConfig(str(models.target), host="127.0.0.1", grpc_port=0,
                                                      metrics_port=free_port(), kv_cache_memory_bytes=KV_BYTES)))
    draft = aio.run(start_draft(DraftServiceConfig(str(models.target), spec_config("ngram", models), host="127.0.0.1",
                                                   grpc_port=0, metrics_port=free_port())))
    gw = aio.run(start_gateway(GatewayConfig(
        str(models.target), spec_config("ngram", models), host="127.0.0.1", port=0, grpc_port=0,
        target_addresses=(f"127.0.0.1:{target.port}",), draft_addresses=(f"127.0.0.1:{draft.port}",))))
    ports = {"gateway": gw.http_port, "target": target.metrics_port, "draft": draft.metrics_port}
    for name, port in ports.items():
        status, _, text = http(port, "/metrics")
        assert status == 200 and "specsplit_" in text, name
    for handle in (gw, draft, target):  # a normal stop, as on SIGTERM
        aio.run(handle.shutdown(5.0))
    assert [name for name, port in ports.items() if not _refused(port)] == []
