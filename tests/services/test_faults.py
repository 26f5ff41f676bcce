"""Faults test_failover.py does not cover: a hung replica, no replica at all, a tier that comes back.

- A target replica that stops answering (SIGSTOP: the TCP connection stays up, so only the
  per-round deadline can notice) has its round re-run on the other replica; no token is
  duplicated or lost.
- With every target replica SIGKILLed, in-flight and new requests fail with UNAVAILABLE
  within seconds (bounded retries with backoff) instead of hanging until their deadline;
  once a replica is back at its address the same gateway serves again.
- A draft tier that is down from the start: plain target decoding, and the stats say so.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from gateway.config import GatewayConfig
from gateway.server import GatewayHandle, start_gateway
from specsplit.launcher import free_port
from specsplit.proto.v1 import gateway_pb2, gateway_pb2_grpc
from specsplit.serving.grpc_server import channel_options
from tests.services.conftest import (
    Cluster,
    LoopThread,
    Reference,
    ReplicaProcess,
    TinyModels,
    greedy_pb,
    spec_config,
    stream_text,
)

PROMPT = "def fibonacci(n):"
MAX_TOKENS = 300


class Targets:
    """Two target replicas as processes on fixed ports, so a restarted one keeps its address."""

    def __init__(self, models: TinyModels, logs: Path) -> None:
        self.models = models
        self.logs = logs
        self.ports = {"a": free_port(), "b": free_port()}
        self.procs = {n: self._start(n) for n in self.ports}

    def _start(self, name: str) -> ReplicaProcess:
        log = self.logs / f"target-{name}-{time.monotonic_ns()}.log"
        return ReplicaProcess("target", [str(self.models.target)], log, port=self.ports[name])

    def restart(self, name: str) -> ReplicaProcess:
        self.procs[name].stop()
        self.procs[name] = self._start(name)
        self.procs[name].wait_ready()
        return self.procs[name]

    def addresses(self) -> tuple[str, ...]:
        return tuple(f"127.0.0.1:{p}" for p in self.ports.values())

    def by_address(self, address: str) -> ReplicaProcess:
        return next(p for p in self.procs.values() if p.address == address)


@pytest.fixture(scope="module")
def targets(models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Targets]:
    t = Targets(models, tmp_path_factory.mktemp("fault-logs"))
    try:
        for p in t.procs.values():
            p.wait_ready()
        yield t
    finally:
        for p in t.procs.values():
            if p.proc.poll() is None:
                p.proc.send_signal(signal.SIGCONT)
            p.stop()


def _gateway(aio: LoopThread, cluster: Cluster, targets: Targets, **cfg: object) -> GatewayHandle:
    return aio.run(start_gateway(GatewayConfig(
        str(cluster.models.target), spec_config("ngram", cluster.models), host="127.0.0.1", port=0, grpc_port=0,
        target_addresses=targets.addresses(), draft_addresses=(f"127.0.0.1:{cluster.drafts['ngram'].port}",),
        **cfg)))  # type: ignore[arg-type]


def _holder(aio: LoopThread, gw: GatewayHandle) -> str:
    load = aio.call(lambda: dict(gw.core.targets.load))
    holding = [a for a, n in load.items() if n > 0]
    assert len(holding) == 1, load
    return holding[0]


@pytest.mark.timeout(120)
def test_a_hung_target_round_times_out_and_is_rerun_on_the_other_replica(
        aio: LoopThread, cluster: Cluster, reference: Reference, targets: Targets) -> None:
    gw = _gateway(aio, cluster, targets, round_timeout_s=1.0)
    hung = None
    try:
        ids: list[int] = []
        final = None
        t0 = time.monotonic()
        with grpc.insecure_channel(f"127.0.0.1:{gw.port}") as ch:
            for msg in gateway_pb2_grpc.GatewayStub(ch).Generate(
                    gateway_pb2.GenerateRequest(text=PROMPT, params=greedy_pb(MAX_TOKENS)), timeout=60):
                ids += msg.token_ids
                if msg.HasField("usage"):
                    final = msg
                if hung is None and len(ids) >= 20:
                    hung = targets.by_address(_holder(aio, gw))
                    hung.proc.send_signal(signal.SIGSTOP)  # alive, connected, silent
        assert final is not None and hung is not None
        assert ids == reference.greedy(PROMPT, MAX_TOKENS).token_ids  # no duplicate, no gap
        assert final.usage.completion_tokens == MAX_TOKENS
        assert hung.address in gw.core.targets._failed_at
        assert gw.core.metrics.registry.get_sample_value("specsplit_failovers_total") >= 1
        assert time.monotonic() - t0 < 30
    finally:
        if hung is not None:
            hung.proc.send_signal(signal.SIGCONT)
        aio.run(gw.shutdown(1.0))


def _http_completion(port: int, timeout: float = 30) -> tuple[int, dict]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", method="POST",
        data=json.dumps({"prompt": PROMPT, "max_tokens": 8, "temperature": 0}).encode(),
        headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.timeout(180)
def test_with_no_target_left_requests_fail_unavailable_fast_and_the_gateway_reconnects(
        aio: LoopThread, cluster: Cluster, reference: Reference, targets: Targets) -> None:
    for name in targets.ports:  # the previous test may have left one stopped
        if targets.procs[name].proc.poll() is None:
            targets.procs[name].proc.send_signal(signal.SIGCONT)
    gw = _gateway(aio, cluster, targets, round_timeout_s=5.0)
    try:
        # in flight: every target replica dies mid-stream
        ids: list[int] = []
        with grpc.insecure_channel(f"127.0.0.1:{gw.port}") as ch, pytest.raises(grpc.RpcError) as e:
            for msg in gateway_pb2_grpc.GatewayStub(ch).Generate(
                    gateway_pb2.GenerateRequest(text=PROMPT, params=greedy_pb(MAX_TOKENS)), timeout=60):
                ids += msg.token_ids
                if len(ids) >= 20 and targets.procs["a"].proc.poll() is None:
                    t_kill = time.monotonic()
                    for p in targets.procs.values():
                        p.kill()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
        assert time.monotonic() - t_kill < 15, "the stream hung instead of failing"
        assert ids == reference.greedy(PROMPT, MAX_TOKENS).token_ids[: len(ids)]  # what came was right
        # new requests: UNAVAILABLE over gRPC, 503 over HTTP (at the same time), each within seconds
        t0 = time.monotonic()
        http = ThreadPoolExecutor(1).submit(_http_completion, gw.http_port)
        with pytest.raises(grpc.RpcError) as e:
            stream_text(f"127.0.0.1:{gw.port}", PROMPT, greedy_pb(8), 60)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - t0 < 15
        status, body = http.result(30)
        assert status == 503 and body["error"]["type"] == "service_unavailable"
        # one replica comes back at its address: the same gateway reconnects (no restart, no rediscovery)
        targets.restart("a")
        t_back = time.monotonic()
        while True:
            try:
                out = stream_text(f"127.0.0.1:{gw.port}", PROMPT, greedy_pb(16), 30)
                break
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE
                assert time.monotonic() - t_back < 10, "the gateway did not reconnect to the restarted replica"
                time.sleep(0.2)
        assert out.token_ids == reference.greedy(PROMPT, 16).token_ids
    finally:
        aio.run(gw.shutdown(1.0))


@pytest.mark.timeout(60)
def test_a_draft_tier_down_from_the_start_falls_back_to_plain_decoding(
        aio: LoopThread, cluster: Cluster, reference: Reference) -> None:
    gw = aio.run(start_gateway(GatewayConfig(
        str(cluster.models.target), spec_config("draft_model", cluster.models), host="127.0.0.1", port=0,
        grpc_port=0, target_addresses=(f"127.0.0.1:{cluster.target.port}",),
        draft_addresses=(f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"))))  # nothing listens there
    try:
        out = stream_text(f"127.0.0.1:{gw.port}", PROMPT, greedy_pb(24), 30)
        assert out.token_ids == reference.greedy(PROMPT, 24).token_ids
        assert out.final is not None and out.final.stats.draft_fallback and out.final.stats.drafted_tokens == 0
        status, body = _http_completion(gw.http_port)
        assert status == 200 and body["speculation"]["draft_fallback"] is True
        assert body["choices"][0]["text"] == reference.greedy(PROMPT, 8).text
    finally:
        aio.run(gw.shutdown(1.0))


def test_keepalive_and_reconnect_settings_fit_together() -> None:
    """Clients ping no more often than servers allow (else GOAWAY too_many_pings), dead peers are
    noticed within ~30 s even when idle, and a restarted replica is retried within a second."""
    opts = dict(channel_options())
    assert opts["grpc.keepalive_time_ms"] >= opts["grpc.http2.min_ping_interval_without_data_ms"]
    assert opts["grpc.keepalive_time_ms"] + opts["grpc.keepalive_timeout_ms"] <= 30_000
    assert opts["grpc.keepalive_permit_without_calls"] == 1
    assert opts["grpc.max_reconnect_backoff_ms"] <= 1_000
