"""Random and malformed messages to every public and internal RPC (hypothesis).

Public: Gateway.Generate / GenerateUnary / ListModels. Internal: the draft and target
Session streams, fed random sequences of well-typed messages (random fields, any order) and
raw bytes that may not parse at all. Every call ends in OK or a proper error with a message
(tests/fuzz/conftest.py); afterwards the servers still serve, hold no session and no KV.
Examples are few and requests short (max_tokens_limit=8) so the module runs in seconds.
"""

from __future__ import annotations

import os
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gateway.server import GatewayHandle
from specsplit.proto.v1 import (
    common_pb2,
    draft_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
)
from specsplit.serving.convert import TOKEN_CHOICE
from tests.fuzz.conftest import assert_idle, check_status
from tests.services.conftest import Cluster, Reference, greedy_choice_pb, greedy_pb

VOCAB = 384  # the tiny models' vocabulary
# SPECSPLIT_FUZZ_EXAMPLES=5000 for a long run; 120 keeps CI fast
FUZZ = settings(max_examples=int(os.environ.get("SPECSPLIT_FUZZ_EXAMPLES", "120")), deadline=None,
                database=None, suppress_health_check=list(HealthCheck))
TIMEOUT = 20.0  # a hang shows up as DEADLINE_EXCEEDED, which check_status refuses

# ---- strategies ------------------------------------------------------------------------------
# Mostly valid values with random ones mixed in (one_of picks each branch about equally), so
# many requests get past validation and exercise generation, sessions, KV growth and rollback.

U32 = st.one_of(st.integers(0, 8), st.integers(0, 2**32 - 1))
TOKEN = st.one_of(st.integers(0, VOCAB - 1), st.integers(0, VOCAB - 1), st.integers(0, 2**32 - 1))
F32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
TEXT = st.text(max_size=40)
PROMPTS = st.sampled_from(["hello", "def fibonacci(n):", "The quick brown fox", "for i in range(10):"])


def mostly(valid: st.SearchStrategy[Any], wild: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """About three in four draws valid (hypothesis favours the first branch of one_of otherwise)."""
    return st.integers(0, 3).flatmap(lambda i: wild if i == 3 else valid)


@st.composite
def sampling_params(draw: st.DrawFn) -> common_pb2.SamplingParams:
    pb = common_pb2.SamplingParams(max_tokens=draw(mostly(st.integers(1, 6), U32)))
    fields = {
        "n": mostly(st.integers(1, 2), U32), "temperature": mostly(st.sampled_from([0.0, 0.7, 1.0]), F32),
        "top_p": mostly(st.floats(0.125, 1.0, width=32), F32),
        "top_k": mostly(st.integers(-1, 50), st.integers(-(2**31), 2**31 - 1)),
        "min_p": mostly(st.floats(0, 0.5, width=32), F32), "seed": st.integers(-(2**63), 2**63 - 1),
        "logprobs": mostly(st.integers(0, 3), U32), "repetition_penalty": mostly(st.floats(0.5, 2.0, width=32), F32),
    }
    for name in draw(st.sets(st.sampled_from(sorted(fields)), max_size=4)):
        setattr(pb, name, draw(fields[name]))
    pb.stop.extend(draw(st.lists(st.text(max_size=300), max_size=3)))
    pb.stop_token_ids.extend(draw(st.lists(TOKEN, max_size=3)))
    pb.ignore_eos = draw(st.booleans())
    return pb


@st.composite
def generate_requests(draw: st.DrawFn) -> gateway_pb2.GenerateRequest:
    req = gateway_pb2.GenerateRequest(model=draw(mostly(st.just(""), TEXT)), request_id=draw(TEXT))
    kind = draw(st.sampled_from(["text", "text", "token_ids", "chat", "none"]))
    if kind == "text":
        req.text = draw(mostly(PROMPTS, st.one_of(TEXT, st.text(min_size=1, max_size=3000))))
    elif kind == "token_ids":
        req.token_ids.ids.extend(draw(mostly(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=20),
                                             st.lists(TOKEN, max_size=600))))
    elif kind == "chat":
        role = mostly(st.sampled_from(["system", "user", "assistant", "tool"]), TEXT)
        req.chat.messages.extend(gateway_pb2.ChatMessage(role=draw(role), content=draw(TEXT))
                                 for _ in range(draw(st.integers(0, 3))))
    if draw(mostly(st.just(True), st.booleans())):
        req.params.CopyFrom(draw(sampling_params()))
    return req


@st.composite
def sparse(draw: st.DrawFn, token: int) -> common_pb2.SparseDistribution:
    if draw(mostly(st.just(True), st.just(False))):
        return common_pb2.SparseDistribution(ids=[token], probs=[1.0])  # what the n-gram drafter sends
    n = draw(st.integers(0, 4))
    return common_pb2.SparseDistribution(ids=draw(st.lists(TOKEN, min_size=n, max_size=n + 1)),
                                         probs=draw(st.lists(F32, min_size=n, max_size=n + 1)))


@st.composite
def token_choices(draw: st.DrawFn) -> common_pb2.TokenChoice:
    """The token-choice fields of a drawn request's parameters: what the gateway sends a tier."""
    sp = draw(sampling_params())
    return common_pb2.TokenChoice(**{f: getattr(sp, f) for f in TOKEN_CHOICE if sp.HasField(f)})


def open_params() -> st.SearchStrategy[common_pb2.TokenChoice]:
    sampled = common_pb2.TokenChoice(temperature=1.0, seed=7)
    return st.one_of(st.just(greedy_choice_pb()), st.just(sampled), token_choices())


PROMPT_IDS = mostly(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=20), st.lists(TOKEN, max_size=600))


@st.composite
def target_messages(draw: st.DrawFn) -> Any:
    from specsplit.proto.v1 import target_pb2

    if draw(st.integers(0, 3)) == 0:
        return target_pb2.TargetClientMessage(open=target_pb2.TargetOpen(token_ids=draw(PROMPT_IDS),
                                                                         params=draw(open_params())))
    block = draw(mostly(st.lists(st.integers(0, VOCAB - 1), max_size=5), st.lists(TOKEN, max_size=40)))
    q = [draw(sparse(t)) for t in block] if draw(st.booleans()) else []
    if draw(st.integers(0, 4)) == 0:
        q = q[: draw(st.integers(0, len(q)))]
    return target_pb2.TargetClientMessage(verify=target_pb2.TargetVerify(
        round_id=draw(st.integers(0, 2**64 - 1)), draft_ids=block, q=q))


def _session(draw: st.DrawFn, messages: st.SearchStrategy[Any], open_message: Any) -> list[Any]:
    """Usually a valid open first, then rounds; sometimes any order."""
    rest = draw(st.lists(messages, max_size=5))
    if draw(mostly(st.just(True), st.just(False))):
        rest.insert(0, open_message(token_ids=draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=20)),
                                    params=draw(open_params())))
    return rest


@st.composite
def target_sessions(draw: st.DrawFn) -> list[Any]:
    from specsplit.proto.v1 import target_pb2

    return _session(draw, target_messages(),
                    lambda **kw: target_pb2.TargetClientMessage(open=target_pb2.TargetOpen(**kw)))


@st.composite
def draft_messages(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 3)) == 0:
        return draft_pb2.DraftClientMessage(open=draft_pb2.DraftOpen(token_ids=draw(PROMPT_IDS),
                                                                     params=draw(open_params())))
    return draft_pb2.DraftClientMessage(propose=draft_pb2.DraftPropose(
        round_id=draw(st.integers(0, 2**64 - 1)), prefix_len=draw(mostly(st.integers(1, 12), U32)),
        new_tokens=draw(st.lists(TOKEN, max_size=10)), k=draw(mostly(st.integers(0, 5), U32))))


@st.composite
def draft_sessions(draw: st.DrawFn) -> list[Any]:
    return _session(draw, draft_messages(), lambda **kw: draft_pb2.DraftClientMessage(open=draft_pb2.DraftOpen(**kw)))


def raw(messages: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """Serialized messages, truncated or corrupted, or plain random bytes (often not protobuf)."""
    def mangle(b: bytes, cut: int, flip: int) -> bytes:
        if not b:
            return b
        b = b[: max(1, cut % (len(b) + 1))]
        i = flip % len(b)
        return b[:i] + bytes([b[i] ^ 0xFF]) + b[i + 1:]
    return st.one_of(
        messages.map(lambda m: m.SerializeToString()),
        st.builds(mangle, messages.map(lambda m: m.SerializeToString()), st.integers(0, 10**6), st.integers(0, 10**6)),
        st.binary(max_size=64),
    )


# ---- helpers ---------------------------------------------------------------------------------


def _call(fn: Any) -> None:
    try:
        fn()
        event("OK")
    except grpc.RpcError as e:
        check_status(e)
        event(e.code().name)  # type: ignore[attr-defined]


def _stream(channel: grpc.Channel, method: str, items: list[bytes]) -> None:
    call = channel.stream_stream(method, request_serializer=None, response_deserializer=None)
    _call(lambda: list(call(iter(items), timeout=TIMEOUT)))


def _gateway(cluster: Cluster) -> GatewayHandle:
    return cluster.gateway("draft_model", max_tokens_limit=8)


def _still_serves(cluster: Cluster, reference: Reference) -> None:
    gw = _gateway(cluster)
    with grpc.insecure_channel(f"127.0.0.1:{gw.port}") as ch:
        ok = gateway_pb2_grpc.GatewayStub(ch).GenerateUnary(
            gateway_pb2.GenerateRequest(text="hello", params=greedy_pb(6)), timeout=TIMEOUT)
    assert list(ok.token_ids) == reference.greedy("hello", 6).token_ids
    assert_idle(cluster)


# ---- public API ------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_gateway_answers_random_requests_properly(cluster: Cluster, reference: Reference) -> None:
    gw = _gateway(cluster)
    with grpc.insecure_channel(f"127.0.0.1:{gw.port}") as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)

        @FUZZ
        @given(req=generate_requests(), rpc=st.sampled_from(["Generate", "GenerateUnary"]))
        def one(req: gateway_pb2.GenerateRequest, rpc: str) -> None:
            if rpc == "Generate":
                _call(lambda: list(stub.Generate(req, timeout=TIMEOUT)))
            else:
                _call(lambda: stub.GenerateUnary(req, timeout=TIMEOUT))

        one()
    _still_serves(cluster, reference)


@pytest.mark.timeout(120)
def test_gateway_answers_malformed_bytes_properly(cluster: Cluster, reference: Reference) -> None:
    gw = _gateway(cluster)
    with grpc.insecure_channel(f"127.0.0.1:{gw.port}") as ch:
        methods = {m: ch.unary_stream(f"/specsplit.v1.Gateway/{m}") if m == "Generate"
                   else ch.unary_unary(f"/specsplit.v1.Gateway/{m}")
                   for m in ("Generate", "GenerateUnary", "ListModels")}

        @FUZZ
        @given(data=raw(generate_requests()), method=st.sampled_from(sorted(methods)))
        def one(data: bytes, method: str) -> None:
            call = methods[method]
            _call((lambda: list(call(data, timeout=TIMEOUT))) if method == "Generate" else
                  (lambda: call(data, timeout=TIMEOUT)))

        one()
    _still_serves(cluster, reference)


# ---- internal API ----------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tier", ["target", "draft_model", "ngram"])
def test_tier_sessions_answer_random_message_sequences_properly(
        cluster: Cluster, reference: Reference, tier: str) -> None:
    handle = cluster.target if tier == "target" else cluster.drafts[tier]
    method = "/specsplit.v1.TargetService/Session" if tier == "target" else "/specsplit.v1.DraftService/Session"
    sessions, messages = (target_sessions(), target_messages()) if tier == "target" else \
        (draft_sessions(), draft_messages())
    encoded = sessions.map(lambda ms: [m.SerializeToString() for m in ms])
    # a sequence of valid messages, or one where some are corrupted bytes
    mixed = st.lists(st.one_of(messages.map(lambda m: m.SerializeToString()), raw(messages)), max_size=6)
    with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as ch:

        @FUZZ
        @given(items=st.one_of(encoded, encoded, mixed))
        def one(items: list[bytes]) -> None:
            _stream(ch, method, items)

        one()
    _still_serves(cluster, reference)
