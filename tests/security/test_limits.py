"""Limits at every boundary: message and body sizes, request fields, streams per connection,
and token ids from a faulty draft, which must neither crash nor corrupt the target."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.server import GatewayHandle
from specsplit.proto.v1 import common_pb2, draft_pb2, draft_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from specsplit.serving.grpc_server import MAX_MESSAGE_BYTES, start_grpc_server
from specsplit.serving.tls import ServerTLS
from tests.security.conftest import SecureCluster, target_session
from tests.services.conftest import LoopThread, Reference, greedy_pb

VOCAB = 384  # the tiny models' vocabulary
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def gw(secure: SecureCluster) -> Any:
    g = secure.gateway(max_prompt_tokens=64, max_tokens_limit=100)
    yield g
    secure.close_gateway(g)


def post(g: GatewayHandle, body: bytes | dict) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{g.http_port}/v1/completions", data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, json.loads(raw) if e.headers.get("Content-Type", "").startswith("application/json") else raw


def unary(g: GatewayHandle, req: gateway_pb2.GenerateRequest) -> gateway_pb2.GenerateResponse:
    with grpc.insecure_channel(f"127.0.0.1:{g.port}") as ch:
        return gateway_pb2_grpc.GatewayStub(ch).GenerateUnary(req, timeout=30)


# name: (extra OpenAI fields, extra gRPC SamplingParams fields, a word of the error)
FIELD_LIMITS: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    "n": ({"n": 17}, {"n": 17}, "n must be"),
    "max_tokens": ({"max_tokens": 101}, {"max_tokens": 101}, "limit of 100"),
    "stop_count": ({"stop": ["a"] * 17}, {"stop": ["a"] * 17}, "at most 16"),
    "stop_length": ({"stop": ["x" * 257]}, {"stop": ["x" * 257]}, "256"),
    "stop_token_ids": ({"stop_token_ids": [1] * 257}, {"stop_token_ids": [1] * 257}, "at most 256"),
    "logprobs": ({"logprobs": 21}, {"logprobs": 21}, "logprobs"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(FIELD_LIMITS) + ["prompt_tokens"])
def test_request_limits_on_both_apis(gw: GatewayHandle, reference: Reference, case: str) -> None:
    if case == "prompt_tokens":
        http_fields, pb, word = {"prompt": [5] * 65}, {}, "limit is 64"
        req = gateway_pb2.GenerateRequest(token_ids=gateway_pb2.TokenIds(ids=[5] * 65), params=greedy_pb(4))
    else:
        http_fields, pb_fields, word = FIELD_LIMITS[case]
        pb = common_pb2.SamplingParams(max_tokens=4, **pb_fields) if "max_tokens" not in pb_fields \
            else common_pb2.SamplingParams(**pb_fields)
        req = gateway_pb2.GenerateRequest(text="hello", params=pb)
    status, err = post(gw, {"prompt": "hello", "max_tokens": 4, **http_fields})
    assert status == 400 and word in err["error"]["message"], err
    with pytest.raises(grpc.RpcError) as e:
        unary(gw, req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and word in (e.value.details() or "")
    status, ok = post(gw, {"prompt": "hello", "max_tokens": 5, "temperature": 0, "ignore_eos": True})
    assert status == 200 and ok["choices"][0]["text"] == reference.greedy("hello", 5).text


@pytest.mark.timeout(60)
def test_oversized_messages_and_bodies_are_refused(gw: GatewayHandle) -> None:
    with pytest.raises(grpc.RpcError) as e:
        unary(gw, gateway_pb2.GenerateRequest(text="x" * (MAX_MESSAGE_BYTES + 1), params=greedy_pb(4)))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status, _ = post(gw, b'{"prompt": "' + b"x" * (8 * 2**20) + b'"}')
    assert status == 413
    assert len(unary(gw, gateway_pb2.GenerateRequest(text="hello", params=greedy_pb(4))).token_ids) == 4


@pytest.mark.timeout(30)
def test_concurrent_streams_per_connection_are_capped(aio: LoopThread) -> None:
    srv = aio.run(start_grpc_server(lambda s: None, [], host="127.0.0.1", port=0, max_concurrent_streams=2))
    aio.run(srv.set_serving(True))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            watches = []
            for _ in range(3):  # one at a time: the transport does not start queued streams in order
                watches.append(stub.Watch(health_pb2.HealthCheckRequest(), timeout=20))
                if len(watches) < 3:
                    assert next(watches[-1]).status == SERVING
            third: list[Any] = []
            t = threading.Thread(target=lambda: third.append(next(watches[2])), daemon=True)
            t.start()
            t.join(1.0)
            assert not third, "a third stream ran on a connection limited to two"
            watches[0].cancel()  # a slot frees up: the queued stream starts
            t.join(10)
            assert third and third[0].status == SERVING
            for w in watches[1:]:
                w.cancel()
    finally:
        aio.run(srv.shutdown(0))


# --- a faulty draft -----------------------------------------------------------------------------


class FaultyDraft(draft_pb2_grpc.DraftServiceServicer):
    """Answers every proposal with ids no correct draft would send."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids
        self.proposals = 0

    async def Session(self, request_iterator: AsyncIterator[draft_pb2.DraftClientMessage],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[draft_pb2.DraftServerMessage]:
        async for msg in request_iterator:
            if msg.WhichOneof("kind") == "propose":
                self.proposals += 1
                yield draft_pb2.DraftServerMessage(proposal=draft_pb2.DraftProposal(
                    round_id=msg.propose.round_id, token_ids=self.ids))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ids", [[5, VOCAB], [2**32 - 1], [5] * 12], ids=["vocab", "uint32_max", "longer_than_k"])
def test_a_faulty_draft_is_dropped_and_the_answer_stays_right(
        secure: SecureCluster, reference: Reference, ids: list[int]) -> None:
    faulty = FaultyDraft(ids)
    p = secure.pki
    srv = secure.aio.run(start_grpc_server(lambda s: draft_pb2_grpc.add_DraftServiceServicer_to_server(faulty, s),
                                           [], host="127.0.0.1", port=0, tls=ServerTLS(p.tier.cert, p.tier.key, p.ca)))
    g = secure.gateway(draft_address=f"127.0.0.1:{srv.port}")
    try:
        out = unary(g, gateway_pb2.GenerateRequest(text="the quick brown fox", params=greedy_pb(12)))
        assert faulty.proposals >= 1
        assert list(out.token_ids) == reference.greedy("the quick brown fox", 12).token_ids
        assert out.stats.draft_fallback  # said so in the response stats
    finally:
        secure.close_gateway(g)
        secure.aio.run(srv.shutdown(0))


@pytest.mark.timeout(60)
def test_the_target_rejects_out_of_range_draft_ids_and_keeps_serving(secure: SecureCluster) -> None:
    """What a faulty draft sends, forwarded verbatim (the target does not trust the gateway's checks)."""
    with secure.target_channel() as ch:
        baseline = target_session(ch, 16)
        errors: list[grpc.RpcError] = []

        def hammer() -> None:
            for bad in [VOCAB, VOCAB + 1, 2**31, 2**32 - 1] * 5:
                try:
                    target_session(ch, blocks=[[4, 5], [7, bad]])
                except grpc.RpcError as e:
                    errors.append(e)

        threads = [threading.Thread(target=hammer) for _ in range(2)]
        for t in threads:
            t.start()
        during = [target_session(ch, 16) for _ in range(4)]  # batched with the bad blocks
        for t in threads:
            t.join(30)
        assert len(errors) == 40
        for e in errors:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "outside the vocabulary [0, 384)" in (e.details() or "")
        assert during == [baseline] * 4  # no other session was disturbed
        assert target_session(ch, 16) == baseline
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
