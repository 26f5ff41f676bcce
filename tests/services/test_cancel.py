"""A cancelled client frees the sessions (and their KV cache) on the draft and target tiers."""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
import pytest

from draft_service.config import DraftServiceConfig
from draft_service.server import start_draft
from specsplit.proto.v1 import (
    draft_pb2,
    draft_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    target_pb2,
    target_pb2_grpc,
)
from target_service.config import TargetServiceConfig
from target_service.server import start_target
from tests.services.conftest import (
    KV_BYTES,
    Cluster,
    LoopThread,
    TinyModels,
    greedy_choice_pb,
    greedy_pb,
    sample,
    spec_config,
)


def _gateway_sample(gw, name: str, labels: dict[str, str] | None = None) -> float:  # noqa: ANN001
    return gw.core.metrics.registry.get_sample_value(name, labels or {}) or 0.0


@pytest.mark.timeout(60)
def test_cancelled_stream_frees_sessions_on_both_tiers(cluster: Cluster) -> None:
    gw = cluster.gateway("draft_model")
    target, draft = cluster.target, cluster.drafts["draft_model"]
    cluster.wait_idle()
    closed_before = (sample(target, "specsplit_sessions_closed_total"), sample(draft, "specsplit_sessions_closed_total"))
    cancelled_before = _gateway_sample(gw, "specsplit_requests_total", {"outcome": "cancelled"})
    with grpc.insecure_channel(f"127.0.0.1:{gw.port}") as ch:
        call = gateway_pb2_grpc.GatewayStub(ch).Generate(
            gateway_pb2.GenerateRequest(text="def fibonacci(n):", params=greedy_pb(400)), timeout=60)
        received = 0
        for msg in call:
            received += len(msg.token_ids)
            if received >= 10:
                break
        # mid-stream: one session on each tier, holding KV blocks
        assert sample(target, "specsplit_active_sessions") == 1
        assert sample(draft, "specsplit_active_sessions") == 1
        assert sample(target, "specsplit_kv_cache_usage_ratio") > 0
        assert sample(draft, "specsplit_kv_cache_usage_ratio") > 0
        assert _gateway_sample(gw, "specsplit_active_sessions") == 1
        call.cancel()
        with pytest.raises(grpc.RpcError) as e:
            next(call)
        assert e.value.code() == grpc.StatusCode.CANCELLED
    cluster.wait_idle()  # active sessions 0 and KV usage 0 on every tier
    assert sample(target, "specsplit_sessions_closed_total") == closed_before[0] + 1
    assert sample(draft, "specsplit_sessions_closed_total") == closed_before[1] + 1
    deadline = time.monotonic() + 5
    while _gateway_sample(gw, "specsplit_requests_total", {"outcome": "cancelled"}) == cancelled_before:
        assert time.monotonic() < deadline, "the gateway did not count the cancelled request"
        time.sleep(0.02)
    assert _gateway_sample(gw, "specsplit_active_sessions") == 0
    assert all(v == 0 for v in gw.core.targets.load.values()) and all(v == 0 for v in gw.core.drafts.load.values())
    assert received < 400


def _open_then_wait(open_msg, stop: threading.Event):  # noqa: ANN001, ANN202
    yield open_msg
    stop.wait(30)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tier", ["target", "draft"])
def test_client_cancelled_during_a_slow_open_leaks_no_session(aio: LoopThread, models: TinyModels, tier: str) -> None:
    """The client gives up while the tier still prefills (a long prompt): the session is freed anyway."""
    from specsplit.factory import load_drafter, load_target

    verifier, tok = load_target(str(models.target), kv_cache_bytes=KV_BYTES)
    if tier == "target":
        engine: Any = verifier
        start = start_target(TargetServiceConfig(str(models.target), host="127.0.0.1", grpc_port=0, metrics_port=0),
                             verifier)
        stub_cls, msg = target_pb2_grpc.TargetServiceStub, target_pb2.TargetClientMessage(
            open=target_pb2.TargetOpen(token_ids=[1, 2, 3], params=greedy_choice_pb()))
    else:
        sc = spec_config("draft_model", models)
        engine = load_drafter(sc, tok, verifier.vocab_size, kv_cache_bytes=KV_BYTES)
        start = start_draft(DraftServiceConfig(str(models.target), sc, host="127.0.0.1", grpc_port=0, metrics_port=0),
                            engine)
        stub_cls, msg = draft_pb2_grpc.DraftServiceStub, draft_pb2.DraftClientMessage(
            open=draft_pb2.DraftOpen(token_ids=[1, 2, 3], params=greedy_choice_pb()))
    handle = aio.run(start)
    real_open = engine.open

    def slow_open(*args: Any) -> None:  # a long prompt's prefill, as far as the client can tell
        real_open(*args)
        time.sleep(0.5)

    engine.open = slow_open
    stop = threading.Event()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as ch:
            calls = [stub_cls(ch).Session(_open_then_wait(msg, stop), timeout=30) for _ in range(2)]
            time.sleep(0.2)  # both opens are running or queued on the model thread
            for c in calls:
                c.cancel()
            stop.set()
        deadline = time.monotonic() + 10
        while sample(handle, "specsplit_active_sessions") or sample(handle, "specsplit_kv_cache_usage_ratio"):
            assert time.monotonic() < deadline, (
                f"{tier}: {sample(handle, 'specsplit_active_sessions')} session(s) left open after the client cancelled")
            time.sleep(0.05)
        assert sample(handle, "specsplit_sessions_closed_total") == sample(handle, "specsplit_sessions_opened_total")
    finally:
        aio.run(handle.shutdown(0.5))
