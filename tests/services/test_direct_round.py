"""The direct round: the target tier drives the rounds and dials the draft replica itself."""

from __future__ import annotations

import grpc
import pytest

from specsplit.proto.v1 import common_pb2, target_pb2, target_pb2_grpc
from tests.services.conftest import Cluster, Reference, greedy_pb, stream_text


def _generate(cluster: Cluster, start: target_pb2.GenerateStart) -> list[target_pb2.GenerateDelta]:
    with grpc.insecure_channel(f"127.0.0.1:{cluster.target.port}") as ch:
        call = target_pb2_grpc.TargetServiceStub(ch).Generate(
            iter([target_pb2.GenerateClientMessage(start=start)]), timeout=60)
        return [m.delta for m in call]


@pytest.mark.timeout(60)
def test_target_tier_drives_a_completion_to_its_stopping_rule(cluster: Cluster, reference: Reference) -> None:
    prompt_ids = reference.tokenizer.encode("def fibonacci(n):")
    ref = reference.greedy("def fibonacci(n):", 20)
    deltas = _generate(cluster, target_pb2.GenerateStart(
        token_ids=prompt_ids, params=common_pb2.TokenChoice(temperature=0.0),
        stopping=target_pb2.Stopping(max_new_tokens=20),
        draft_address=f"127.0.0.1:{cluster.drafts['draft_model'].port}", num_speculative_tokens=4, pipeline=True))
    ids = [t for d in deltas for t in d.token_ids]
    assert ids == ref.token_ids  # exactly max_new_tokens, token-identical to the target alone
    assert sum(d.drafted for d in deltas) > 0 and all(d.timing.round_ns > 0 for d in deltas)
    assert all(len(d.token_ids) == d.accepted + 1 for d in deltas)


@pytest.mark.timeout(60)
def test_round_timings_split_the_draft_wait_into_handling_and_transit(cluster: Cluster, reference: Reference) -> None:
    """The draft tier reports its whole handling of each request, so the timeline can tell the RPC's
    transit from the tier's own code: handling covers the step and its queue, and fits in the wait."""
    deltas = _generate(cluster, target_pb2.GenerateStart(
        token_ids=reference.tokenizer.encode("def add(a, b):"), params=common_pb2.TokenChoice(temperature=0.0),
        stopping=target_pb2.Stopping(max_new_tokens=16),
        draft_address=f"127.0.0.1:{cluster.drafts['draft_model'].port}", num_speculative_tokens=3, pipeline=False))
    waited = [d.timing for d in deltas if d.timing.draft_ns > 0]  # rounds that waited for a fresh block
    assert waited
    for t in waited:
        assert t.draft_ns + t.draft_queue_ns <= t.draft_handled_ns <= t.draft_wait_ns


@pytest.mark.timeout(60)
def test_pipelined_round_timings_tell_the_wait_for_the_guess_drafted_ahead(cluster: Cluster,
                                                                          reference: Reference) -> None:
    """Pipelined: after each verdict the loop first waits for the block drafted ahead beside the
    verify; that wait is part of the round's draft wait, and sequential rounds never have it."""
    start = target_pb2.GenerateStart(
        token_ids=reference.tokenizer.encode("def add(a, b):"), params=common_pb2.TokenChoice(temperature=0.0),
        stopping=target_pb2.Stopping(max_new_tokens=16),
        draft_address=f"127.0.0.1:{cluster.drafts['draft_model'].port}", num_speculative_tokens=3, pipeline=True)
    timings = [d.timing for d in _generate(cluster, start)]
    assert any(t.ahead_wait_ns > 0 for t in timings)
    assert all(t.ahead_wait_ns <= t.draft_wait_ns for t in timings)
    start.pipeline = False
    assert all(d.timing.ahead_wait_ns == 0 for d in _generate(cluster, start))


@pytest.mark.timeout(60)
def test_an_end_token_ends_the_completion_inside_a_block(cluster: Cluster, reference: Reference) -> None:
    prompt_ids = reference.tokenizer.encode("The quick brown fox")
    ref = reference.greedy("The quick brown fox", 12)
    end = ref.token_ids[6]
    first = ref.token_ids.index(end)
    deltas = _generate(cluster, target_pb2.GenerateStart(
        token_ids=prompt_ids, params=common_pb2.TokenChoice(temperature=0.0),
        stopping=target_pb2.Stopping(max_new_tokens=12, end_token_ids=[end]),
        draft_address=f"127.0.0.1:{cluster.drafts['draft_model'].port}", num_speculative_tokens=4))
    assert [t for d in deltas for t in d.token_ids] == ref.token_ids[: first + 1]


@pytest.mark.timeout(60)
def test_an_unreachable_draft_replica_means_plain_decoding(cluster: Cluster, reference: Reference) -> None:
    prompt_ids = reference.tokenizer.encode("for i in range(10):")
    ref = reference.greedy("for i in range(10):", 10)
    deltas = _generate(cluster, target_pb2.GenerateStart(
        token_ids=prompt_ids, params=common_pb2.TokenChoice(temperature=0.0),
        stopping=target_pb2.Stopping(max_new_tokens=10), draft_address="127.0.0.1:1", num_speculative_tokens=4))
    assert [t for d in deltas for t in d.token_ids] == ref.token_ids
    assert any(d.draft_failure for d in deltas) and sum(d.drafted for d in deltas) == 0


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("start", "reason"), [
    (target_pb2.GenerateStart(token_ids=[], stopping=target_pb2.Stopping(max_new_tokens=4)), "empty"),
    (target_pb2.GenerateStart(token_ids=[1, 2], stopping=target_pb2.Stopping(max_new_tokens=0)), "max_new_tokens"),
    (target_pb2.GenerateStart(token_ids=[1, 2], stopping=target_pb2.Stopping(max_new_tokens=4),
                              num_speculative_tokens=99), "exceeds"),
    (target_pb2.GenerateStart(token_ids=[10**7], stopping=target_pb2.Stopping(max_new_tokens=4)), "vocabulary"),
])
def test_a_bad_start_is_invalid_argument(cluster: Cluster, start: target_pb2.GenerateStart, reason: str) -> None:
    with pytest.raises(grpc.RpcError) as e:
        _generate(cluster, start)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in e.value.details()


@pytest.mark.timeout(60)
def test_gateway_in_direct_mode_streams_through_the_target_tier(cluster: Cluster, reference: Reference) -> None:
    gw = cluster.gateway("draft_model", True, False, round_mode="direct")
    before = cluster.target.metrics.registry.get_sample_value("specsplit_steps_total") or 0
    out = stream_text(f"127.0.0.1:{gw.port}", "def fibonacci(n):", greedy_pb(24))
    assert out.token_ids == reference.greedy("def fibonacci(n):", 24).token_ids
    assert out.final.stats.rounds > 0 and out.final.stats.drafted_tokens > 0
    assert (cluster.target.metrics.registry.get_sample_value("specsplit_steps_total") or 0) > before
