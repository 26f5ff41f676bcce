"""Bad input on every public and internal RPC gets the right status and a reason; serving goes on."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from specsplit.proto.v1 import (
    common_pb2,
    draft_pb2,
    draft_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    target_pb2,
    target_pb2_grpc,
)
from tests.services.conftest import Cluster, Reference, greedy_choice_pb, greedy_pb, sample

INVALID = grpc.StatusCode.INVALID_ARGUMENT
VOCAB = 384  # the tiny models' vocabulary
MAX_LEN = 512  # and their context


def expect(code: grpc.StatusCode, fn: Callable[[], Any], *words: str) -> str:
    """`fn` fails with `code` and a message that names the problem."""
    with pytest.raises(grpc.RpcError) as e:
        fn()
    assert e.value.code() == code, f"{e.value.code()}: {e.value.details()}"
    details = e.value.details() or ""
    assert details, "an error status without a message"
    for w in words:
        assert w.lower() in details.lower(), f"{w!r} not in {details!r}"
    return details


# --- target service -------------------------------------------------------------------------------


def t_open(ids: list[int], params: common_pb2.TokenChoice | None = None) -> target_pb2.TargetClientMessage:
    return target_pb2.TargetClientMessage(open=target_pb2.TargetOpen(token_ids=ids, params=params or greedy_choice_pb()))


def t_verify(ids: list[int], q: list[common_pb2.SparseDistribution] | None = None) -> target_pb2.TargetClientMessage:
    return target_pb2.TargetClientMessage(verify=target_pb2.TargetVerify(round_id=1, draft_ids=ids, q=q or []))


def dist(ids: list[int], probs: list[float]) -> common_pb2.SparseDistribution:
    return common_pb2.SparseDistribution(ids=ids, probs=probs)


SAMPLED = common_pb2.TokenChoice(temperature=1.0, seed=1)
ONE = [dist([5], [1.0])]
TWO = [dist([5, 6], [0.5, 0.5]), dist([7], [1.0])]

TARGET_CASES = {
    "verify_before_open": ([t_verify([])], "open"),
    "open_twice": ([t_open([1, 2]), t_open([1, 2])], "verify"),
    "empty_prompt": ([t_open([]), t_verify([])], "empty"),
    "over_long_prompt": ([t_open([1] * MAX_LEN), t_verify([])], "max_model_len"),
    "prompt_id_out_of_range": ([t_open([1, VOCAB]), t_verify([])], "vocabulary"),
    "negative_temperature": ([t_open([1], common_pb2.TokenChoice(temperature=-1.0))], "temperature"),
    "top_p_zero": ([t_open([1], common_pb2.TokenChoice(top_p=0.0))], "top_p"),
    "draft_id_out_of_range": ([t_open([1, 2]), t_verify([3, VOCAB + 7])], "vocabulary"),
    "block_too_long": ([t_open([1, 2]), t_verify([3] * 33)], "limit"),
    "sampled_block_without_q": ([t_open([1, 2], SAMPLED), t_verify([5])], "q"),
    "q_wrong_length": ([t_open([1, 2], SAMPLED), t_verify([5, 7], ONE)], "distributions"),
    "q_not_summing_to_1": ([t_open([1, 2], SAMPLED), t_verify([5], [dist([5, 6], [0.5, 0.2])])], "summing to 1"),
    "q_negative": ([t_open([1, 2], SAMPLED), t_verify([5], [dist([5, 6], [1.5, -0.5])])], "probability"),
    "q_nan": ([t_open([1, 2], SAMPLED), t_verify([5], [dist([5], [float("nan")])])], "probability"),
    "q_ids_probs_unequal": ([t_open([1, 2], SAMPLED), t_verify([5, 7], [dist([5, 6], [1.0]), dist([7], [1.0])])],
                            "equal length"),
    "q_id_out_of_range": ([t_open([1, 2], SAMPLED), t_verify([5], [dist([VOCAB], [1.0])])], "vocabulary"),
}


def _target_session(cluster: Cluster, messages: list[Any], timeout: float = 10.0) -> list[Any]:
    with grpc.insecure_channel(f"127.0.0.1:{cluster.target.port}") as ch:
        return list(target_pb2_grpc.TargetServiceStub(ch).Session(iter(messages), timeout=timeout))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(TARGET_CASES))
def test_target_rejects_bad_input(cluster: Cluster, case: str) -> None:
    messages, word = TARGET_CASES[case]
    errors_before = sample(cluster.target, "specsplit_errors_total", {"code": "INVALID_ARGUMENT"})
    expect(INVALID, lambda: _target_session(cluster, messages), word)
    assert sample(cluster.target, "specsplit_errors_total", {"code": "INVALID_ARGUMENT"}) == errors_before + 1
    # still serving: a good session (prefill, a block, a plain step) works
    out = _target_session(cluster, [t_open([1, 2, 3]), t_verify([4, 5]), t_verify([])])
    assert [r.result.round_id for r in out] == [1, 1] and all(0 <= r.result.next_token < VOCAB for r in out)


@pytest.mark.timeout(30)
def test_target_accepts_a_valid_sampled_block_and_an_empty_stream(cluster: Cluster) -> None:
    out = _target_session(cluster, [t_open([1, 2], SAMPLED), t_verify([5, 7], TWO)])
    assert out[0].result.num_accepted <= 2
    assert _target_session(cluster, []) == []  # a stream closed before `open` is simply done


@pytest.mark.timeout(30)
def test_target_session_cannot_grow_past_the_context(cluster: Cluster) -> None:
    expect(INVALID, lambda: _target_session(cluster, [t_open([1] * (MAX_LEN - 3)), t_verify([2] * 8)]))
    assert _target_session(cluster, [t_open([1, 2, 3]), t_verify([])])


# --- draft service --------------------------------------------------------------------------------


def d_open(ids: list[int], params: common_pb2.TokenChoice | None = None) -> draft_pb2.DraftClientMessage:
    return draft_pb2.DraftClientMessage(open=draft_pb2.DraftOpen(token_ids=ids, params=params or greedy_choice_pb()))


def d_propose(prefix_len: int, new: list[int], k: int) -> draft_pb2.DraftClientMessage:
    return draft_pb2.DraftClientMessage(propose=draft_pb2.DraftPropose(round_id=3, prefix_len=prefix_len,
                                                                       new_tokens=new, k=k))


DRAFT_CASES = {
    "propose_before_open": ([d_propose(1, [], 2)], "open"),
    "open_twice": ([d_open([1, 2]), d_open([1, 2])], "propose"),
    "empty_prompt": ([d_open([])], "empty"),
    "over_long_prompt": ([d_open([1] * MAX_LEN)], "max_model_len"),
    "prompt_id_out_of_range": ([d_open([1, VOCAB])], "vocabulary"),
    "negative_temperature": ([d_open([1], common_pb2.TokenChoice(temperature=-1.0))], "temperature"),
    "top_p_zero": ([d_open([1], common_pb2.TokenChoice(top_p=0.0))], "top_p"),
    "k_too_large": ([d_open([1, 2]), d_propose(2, [], 34)], "k=34"),
    "prefix_len_zero": ([d_open([1, 2]), d_propose(0, [3], 2)], "prefix_len"),
    "prefix_len_past_the_end": ([d_open([1, 2]), d_propose(3, [], 2)], "prefix_len"),
    "new_token_out_of_range": ([d_open([1, 2]), d_propose(2, [VOCAB], 2)], "vocabulary"),
}


def _draft_session(cluster: Cluster, method: str, messages: list[Any], timeout: float = 10.0) -> list[Any]:
    with grpc.insecure_channel(f"127.0.0.1:{cluster.drafts[method].port}") as ch:
        return list(draft_pb2_grpc.DraftServiceStub(ch).Session(iter(messages), timeout=timeout))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(DRAFT_CASES))
@pytest.mark.parametrize("method", ["draft_model", "ngram"])
def test_draft_rejects_bad_input(cluster: Cluster, method: str, case: str) -> None:
    messages, word = DRAFT_CASES[case]
    if case == "over_long_prompt" and method == "ngram":
        pytest.skip("n-gram lookup has no context limit of its own")
    handle = cluster.drafts[method]
    errors_before = sample(handle, "specsplit_errors_total", {"code": "INVALID_ARGUMENT"})
    expect(INVALID, lambda: _draft_session(cluster, method, messages), word)
    assert sample(handle, "specsplit_errors_total", {"code": "INVALID_ARGUMENT"}) == errors_before + 1
    out = _draft_session(cluster, method, [d_open([1, 2, 3, 1, 2]), d_propose(5, [3], 3), d_propose(4, [9], 2)])
    assert [r.proposal.round_id for r in out] == [3, 3]
    assert len(out[0].proposal.token_ids) <= 3 and len(out[1].proposal.token_ids) <= 2
    if method == "draft_model":
        assert len(out[0].proposal.token_ids) == 3


# --- gateway (public gRPC) ------------------------------------------------------------------------

GATEWAY_CASES: dict[str, tuple[dict[str, Any], grpc.StatusCode, str]] = {
    "no_prompt": ({}, INVALID, "prompt"),
    "empty_text": ({"text": ""}, INVALID, "empty"),
    "empty_token_ids": ({"token_ids": gateway_pb2.TokenIds(ids=[])}, INVALID, "empty"),
    "over_long_prompt": ({"token_ids": gateway_pb2.TokenIds(ids=[5] * 600)}, INVALID, "limit"),
    "over_long_text": ({"text": "fox " * 600}, INVALID, "limit"),
    "token_id_out_of_range": ({"token_ids": gateway_pb2.TokenIds(ids=[1, 99999])}, INVALID, "vocabulary"),
    "empty_chat": ({"chat": gateway_pb2.Chat()}, INVALID, "empty"),
    "chat_bad_role": ({"chat": gateway_pb2.Chat(messages=[gateway_pb2.ChatMessage(role="wizard", content="hi")])},
                      INVALID, "role"),
    "negative_temperature": ({"params": common_pb2.SamplingParams(temperature=-1.0)}, INVALID, "temperature"),
    "top_p_zero": ({"params": common_pb2.SamplingParams(top_p=0.0)}, INVALID, "top_p"),
    "max_tokens_zero": ({"params": common_pb2.SamplingParams(max_tokens=0)}, INVALID, "max_tokens"),
    "max_tokens_over_limit": ({"params": common_pb2.SamplingParams(max_tokens=100_000)}, INVALID, "max_tokens"),
    "n_zero": ({"params": common_pb2.SamplingParams(n=0)}, INVALID, "n"),
    "negative_repetition_penalty": ({"params": common_pb2.SamplingParams(repetition_penalty=-1.0)}, INVALID,
                                    "repetition_penalty"),
    "unknown_model": ({"model": "gpt-17"}, grpc.StatusCode.NOT_FOUND, "gpt-17"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rpc", ["Generate", "GenerateUnary"])
@pytest.mark.parametrize("case", sorted(GATEWAY_CASES))
def test_gateway_rejects_bad_requests(cluster: Cluster, reference: Reference, case: str, rpc: str) -> None:
    fields, code, word = GATEWAY_CASES[case]
    fields = {"text": "hello", "params": greedy_pb(4), **fields} if "chat" not in fields and "token_ids" not in fields \
        else {"params": greedy_pb(4), **fields}
    if case == "no_prompt":
        fields.pop("text")
    gw = cluster.gateway("draft_model")
    with grpc.insecure_channel(f"127.0.0.1:{gw.port}") as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        call = getattr(stub, rpc)
        req = gateway_pb2.GenerateRequest(**fields)
        expect(code, (lambda: list(call(req, timeout=10))) if rpc == "Generate" else (lambda: call(req, timeout=10)),
               word)
        ok = stub.GenerateUnary(gateway_pb2.GenerateRequest(text="hello", params=greedy_pb(6)), timeout=10)
    assert list(ok.token_ids) == reference.greedy("hello", 6).token_ids


@pytest.mark.timeout(60)
def test_gateway_full_queue_is_resource_exhausted(cluster: Cluster) -> None:
    gw = cluster.gateway("draft_model", max_concurrent_requests=1, max_queued_requests=0)
    with grpc.insecure_channel(f"127.0.0.1:{gw.port}") as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        long = stub.Generate(gateway_pb2.GenerateRequest(text="hello", params=greedy_pb(400)), timeout=30)
        next(long)  # admitted and running: the only slot is taken
        expect(grpc.StatusCode.RESOURCE_EXHAUSTED,
               lambda: stub.GenerateUnary(gateway_pb2.GenerateRequest(text="hi", params=greedy_pb(4)), timeout=10),
               "capacity")
        long.cancel()
    rejected = gw.core.metrics.registry.get_sample_value("specsplit_requests_total", {"outcome": "rejected"})
    assert rejected == 1
    cluster.wait_idle()
    deadline = time.monotonic() + 5
    while gw.core.metrics.registry.get_sample_value("specsplit_active_sessions"):
        assert time.monotonic() < deadline, "the cancelled request kept its slot"
        time.sleep(0.02)
    with grpc.insecure_channel(f"127.0.0.1:{gw.port}") as ch:
        ok = gateway_pb2_grpc.GatewayStub(ch).GenerateUnary(
            gateway_pb2.GenerateRequest(text="hi", params=greedy_pb(4)), timeout=10)
    assert len(ok.token_ids) == 4
