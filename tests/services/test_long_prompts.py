"""Long prompts through the tiers: a prefill longer than the round timeout succeeds when the
target reports progress chunk by chunk; a round that times out is never re-run on the same
replica; logs and metrics say what happened."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import grpc
import pytest

from gateway.config import GatewayConfig
from gateway.server import GatewayHandle, start_gateway
from specsplit.proto.v1 import gateway_pb2, gateway_pb2_grpc
from specsplit.runtime.runner import ModelRunner
from specsplit.serving.tier import TierHandle
from specsplit.speculation.target import TargetVerifier
from target_service.config import TargetServiceConfig
from target_service.server import start_target
from tests.services.conftest import KV_BYTES, LoopThread, Reference, TinyModels, greedy_pb, sample
from tests.services.test_http import metrics, value

CHUNK = 32
PROMPT_IDS = [(11 * i + 5) % 300 + 3 for i in range(400)]  # 400 tokens: 13 chunks
ROUND_TIMEOUT = 1.5
VERIFIERS: dict[int, SlowVerifier] = {}  # by port

class SlowVerifier(TargetVerifier):
    """Every batched step takes at least `delay` seconds: a slow (or, past the round timeout, hung) device."""

    delay = 0.0

    def step(self, items):  # type: ignore[no-untyped-def]
        time.sleep(self.delay)
        return super().step(items)


def _target(aio: LoopThread, models: TinyModels, delay: float) -> TierHandle:
    runner = ModelRunner.from_folder(models.target, kv_cache_bytes=KV_BYTES)
    verifier = SlowVerifier(runner, prefill_chunk=CHUNK)
    verifier.delay = delay
    handle = aio.run(start_target(TargetServiceConfig(str(models.target), host="127.0.0.1", grpc_port=0,
                                                      metrics_port=0), verifier=verifier))
    VERIFIERS[handle.port] = verifier
    return handle


def _gateway(aio: LoopThread, models: TinyModels, *targets: TierHandle) -> GatewayHandle:
    return aio.run(start_gateway(GatewayConfig(
        str(models.target), None, host="127.0.0.1", port=0, grpc_port=0, round_timeout_s=ROUND_TIMEOUT,
        target_addresses=tuple(f"127.0.0.1:{t.port}" for t in targets))))


def _generate(gw: GatewayHandle, max_tokens: int, timeout: float = 60) -> gateway_pb2.GenerateResponse:
    with grpc.insecure_channel(f"127.0.0.1:{gw.port}") as ch:
        return gateway_pb2_grpc.GatewayStub(ch).GenerateUnary(gateway_pb2.GenerateRequest(
            token_ids=gateway_pb2.TokenIds(ids=PROMPT_IDS), params=greedy_pb(max_tokens)), timeout=timeout)


@pytest.fixture
def stopper(aio: LoopThread) -> Iterator[list]:
    handles: list = []
    yield handles
    for h in handles:
        aio.run(h.shutdown(0.5))


@pytest.mark.timeout(120)
def test_a_prefill_longer_than_the_round_timeout_succeeds_chunk_by_chunk(
        aio: LoopThread, models: TinyModels, reference: Reference, stopper: list) -> None:
    target = _target(aio, models, delay=0.25)  # 13 chunks: ~3.3 s of prefill, each step 0.25 s
    gw = _gateway(aio, models, target)
    stopper += [gw, target]
    t0 = time.monotonic()
    out = _generate(gw, 4)
    assert time.monotonic() - t0 > 2 * ROUND_TIMEOUT  # the prefill really outlasted the round timeout
    ref = reference.llm.generate({"prompt_token_ids": PROMPT_IDS}, greedy_params(4), use_tqdm=False)[0].outputs[0]
    assert list(out.token_ids) == ref.token_ids
    assert value(metrics(gw.http_port), "specsplit_failovers_total") == 0
    assert sample(target, "specsplit_sessions_opened_total") == 1  # one prefill, never re-run


@pytest.mark.timeout(120)
def test_a_round_that_times_out_is_not_rerun_on_the_same_replica(
        aio: LoopThread, models: TinyModels, stopper: list, caplog: pytest.LogCaptureFixture) -> None:
    target = _target(aio, models, delay=2 * ROUND_TIMEOUT)  # no answer, no progress within the timeout
    gw = _gateway(aio, models, target)
    stopper += [gw, target]
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING), pytest.raises(grpc.RpcError) as e:
        _generate(gw, 4)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no other target replica" in e.value.details() and "round timeout" in e.value.details()
    assert time.monotonic() - t0 < 4 * ROUND_TIMEOUT
    assert sample(target, "specsplit_sessions_opened_total") == 1
    fam = metrics(gw.http_port)
    assert value(fam, "specsplit_tier_failures_total", tier="target", code="DEADLINE_EXCEEDED") == 1
    assert value(fam, "specsplit_failovers_total") == 0
    assert "re-opening" not in caplog.text and "moved" not in caplog.text


@pytest.mark.timeout(120)
def test_a_timed_out_session_moves_to_another_replica_and_counts_one_failover(
        aio: LoopThread, models: TinyModels, reference: Reference, stopper: list,
        caplog: pytest.LogCaptureFixture) -> None:
    a, b = _target(aio, models, delay=0.0), _target(aio, models, delay=0.0)
    gw = _gateway(aio, models, a, b)
    stopper += [gw, a, b]
    first = gw.core.targets.addresses[0]  # where the session opens first: make that one hang
    hung, good = (a, b) if first.endswith(f":{a.port}") else (b, a)
    VERIFIERS[hung.port].delay = 2 * ROUND_TIMEOUT
    with caplog.at_level(logging.WARNING):
        out = _generate(gw, 4)
    ref = reference.llm.generate({"prompt_token_ids": PROMPT_IDS}, greedy_params(4), use_tqdm=False)[0].outputs[0]
    assert list(out.token_ids) == ref.token_ids
    assert value(metrics(gw.http_port), "specsplit_failovers_total") == 1
    assert f"moved from replica 127.0.0.1:{hung.port} to 127.0.0.1:{good.port}" in caplog.text


def greedy_params(max_tokens: int):  # noqa: ANN201 - SamplingParams
    from specsplit import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
