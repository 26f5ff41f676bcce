"""The tree of guesses over real servers: lossless, hits below full acceptance, no leaked blocks.

The draft tier here branches on every drafted token's runner-up (branch_alternatives=1, the GPU
default; on a CPU the default is the single all-accepted guess).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from draft_service.config import DraftServiceConfig
from draft_service.server import DraftServicer, start_draft
from gateway.config import GatewayConfig
from gateway.server import GatewayHandle, start_gateway
from specsplit.cli import main
from specsplit.launcher import free_port
from specsplit.proto.v1 import (
    draft_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    target_pb2,
    target_pb2_grpc,
)
from specsplit.sampling.params import SamplingParams
from specsplit.serving.completion_loop import CompletionLoop, Delta, LoopOptions
from specsplit.serving.replicas import ReplicaPool
from specsplit.serving.tier import TierHandle
from specsplit.speculation.adaptive import CostModel
from specsplit.speculation.branches import MAX_BRANCHES
from specsplit.speculation.sequence import Sequence
from tests.services.conftest import (
    KV_BYTES,
    Cluster,
    Reference,
    greedy_pb,
    sample,
    spec_config,
    stream_text,
)
from tests.services.test_http import metrics, value

PROMPTS = ["def fibonacci(n):", "The quick brown fox", "for i in range(10):\n    print("]


@pytest.fixture(scope="module")
def tree_draft(cluster: Cluster) -> Iterator[TierHandle]:
    h = cluster.aio.run(start_draft(DraftServiceConfig(
        str(cluster.models.target), spec_config("draft_model", cluster.models), host="127.0.0.1", grpc_port=0,
        metrics_port=free_port(), kv_cache_memory_bytes=KV_BYTES, branch_alternatives=1)))
    yield h
    cluster.aio.run(h.shutdown(0.5))


@pytest.fixture(autouse=True)
def _tree_draft_idle(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every test: the tree's draft tier has closed its sessions and its KV pool is empty (branches included)."""
    yield
    if "tree_draft" in request.fixturenames:
        h: TierHandle = request.getfixturevalue("tree_draft")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (sample(h, "specsplit_active_sessions") != 0
                                               or sample(h, "specsplit_kv_cache_usage_ratio") != 0):
            time.sleep(0.02)
        assert sample(h, "specsplit_active_sessions") == 0
        assert sample(h, "specsplit_kv_cache_usage_ratio") == 0, "the draft tier kept KV blocks"


def _gateway(cluster: Cluster, draft: TierHandle, round_mode: str, **cfg: Any) -> GatewayHandle:
    return cluster.aio.run(start_gateway(GatewayConfig(
        str(cluster.models.target), spec_config("draft_model", cluster.models), host="127.0.0.1", port=0,
        grpc_port=0, pipeline=True, round_mode=round_mode, target_addresses=(f"127.0.0.1:{cluster.target.port}",),
        draft_addresses=(f"127.0.0.1:{draft.port}",), **cfg)))


@pytest.fixture
def tree_requests(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(max_branches asked, branches answered) of every speculative propose a draft tier serves."""
    seen: list[tuple[int, int]] = []
    reply = DraftServicer.reply

    def spy(self: DraftServicer, msg: Any, result: Any, queue_ns: int, received_ns: int) -> Any:
        out = reply(self, msg, result, queue_ns, received_ns)
        if msg.HasField("branches"):
            seen.append((msg.branches.max_branches, len(out.proposal.branches)))
        return out

    monkeypatch.setattr(DraftServicer, "reply", spy)
    return seen


def _run_loop(cluster: Cluster, draft: TierHandle, prompt_ids: list[int], params: SamplingParams, vocab: int,
              **opts: object) -> tuple[Sequence, list[Delta]]:
    """One completion through CompletionLoop itself (the gateway's round), on the cluster's tiers."""
    async def go() -> tuple[Sequence, list[Delta]]:
        targets = ReplicaPool("target", target_pb2_grpc.TargetServiceStub)
        targets.set_addresses([f"127.0.0.1:{cluster.target.port}"])
        drafts = ReplicaPool("draft", draft_pb2_grpc.DraftServiceStub)
        drafts.set_addresses([f"127.0.0.1:{draft.port}"])
        seq = Sequence(1, list(prompt_ids), params, (), 512)
        loop = CompletionLoop(seq, targets, drafts, CostModel(), LoopOptions(
            num_speculative_tokens=4, adaptive=False, pipeline=True, vocab_size=vocab, **opts))
        try:
            deltas = [d async for d in loop.run()]
        finally:
            await loop.close()
            await targets.close()
            await drafts.close()
        return seq, deltas
    return cluster.aio.run(go(), 120)


def _below_full(deltas: list[Delta]) -> int:
    """Rounds whose block was drafted ahead for an outcome where the last verify rejected a token."""
    return sum(1 for a, b in zip(deltas, deltas[1:], strict=False) if b.pipelined and a.accepted < a.drafted)


@pytest.mark.timeout(180)
def test_greedy_through_the_loop_is_the_targets_own_and_branches_hit(cluster: Cluster, tree_draft: TierHandle, reference: Reference) -> None:
    below = pipelined = 0
    for prompt in PROMPTS:
        ids = reference.tokenizer.encode(prompt)
        seq, deltas = _run_loop(cluster, tree_draft, ids, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True),
                                len(reference.tokenizer))
        assert seq.output_ids == reference.greedy(prompt, 32).token_ids, prompt
        below += _below_full(deltas)
        pipelined += sum(d.pipelined for d in deltas)
    assert below > 0, "no round used a branch below full acceptance"
    assert pipelined > below


@pytest.mark.timeout(180)
def test_one_branch_is_the_old_single_guess_and_still_lossless(cluster: Cluster, tree_draft: TierHandle, reference: Reference) -> None:
    prompt = PROMPTS[0]
    seq, deltas = _run_loop(cluster, tree_draft, reference.tokenizer.encode(prompt),
                            SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
                            len(reference.tokenizer), max_branches=1)
    assert seq.output_ids == reference.greedy(prompt, 24).token_ids


@pytest.mark.timeout(180)
def test_sampled_branches_hit_and_a_seed_repeats(cluster: Cluster, tree_draft: TierHandle, reference: Reference) -> None:
    ids = reference.tokenizer.encode(PROMPTS[1])
    params = SamplingParams(max_tokens=48, temperature=0.6, seed=11, ignore_eos=True)
    seq, deltas = _run_loop(cluster, tree_draft, ids, params, len(reference.tokenizer))
    again, _ = _run_loop(cluster, tree_draft, ids, params, len(reference.tokenizer))
    assert seq.output_ids == again.output_ids
    assert _below_full(deltas) > 0


@pytest.mark.timeout(180)
@pytest.mark.parametrize("round_mode", ["gateway", "direct"])
def test_greedy_through_real_servers_with_branches(cluster: Cluster, tree_draft: TierHandle, reference: Reference,
                                                   round_mode: str) -> None:
    gw = _gateway(cluster, tree_draft, round_mode)
    try:
        pipelined = 0
        for prompt in PROMPTS:
            out = stream_text(f"127.0.0.1:{gw.port}", prompt, greedy_pb(32))
            assert out.token_ids == reference.greedy(prompt, 32).token_ids, prompt
            pipelined += out.final.stats.pipelined_rounds
        assert pipelined > 0
    finally:
        cluster.aio.run(gw.shutdown(0.5))


@pytest.mark.timeout(240)
def test_a_tensor_parallel_draft_tier_drafts_branches_too(cluster: Cluster, reference: Reference,
                                                          tree_requests: list[tuple[int, int]]) -> None:
    """A draft model sharded over two ranks (gloo here) forks its branches on every rank alike:
    the tree hits, output stays the target's own, and the pool is empty afterwards."""
    spec = dataclasses.replace(spec_config("draft_model", cluster.models), draft_tensor_parallel_size=2)
    h = cluster.aio.run(start_draft(DraftServiceConfig(
        str(cluster.models.target), spec, host="127.0.0.1", grpc_port=0, metrics_port=free_port(),
        kv_cache_memory_bytes=KV_BYTES, branch_alternatives=1)), timeout=180)
    try:
        gw = _gateway(cluster, h, "direct")
        try:
            pipelined = 0
            for prompt in PROMPTS[:2]:
                out = stream_text(f"127.0.0.1:{gw.port}", prompt, greedy_pb(32))
                assert out.token_ids == reference.greedy(prompt, 32).token_ids, prompt
                pipelined += out.final.stats.pipelined_rounds
        finally:
            cluster.aio.run(gw.shutdown(0.5))
        assert any(answered > 1 for _, answered in tree_requests), "no request got more than one branch"
        assert pipelined > 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sample(h, "specsplit_kv_cache_usage_ratio") != 0:
            time.sleep(0.02)
        assert sample(h, "specsplit_kv_cache_usage_ratio") == 0, "the TP draft tier kept KV blocks"
    finally:
        cluster.aio.run(h.shutdown(0.5))


@pytest.mark.timeout(60)
def test_a_cancelled_stream_frees_its_branches(cluster: Cluster, tree_draft: TierHandle) -> None:
    """The autouse fixture checks that the draft's KV pool is empty again afterwards."""
    gw = _gateway(cluster, tree_draft, "gateway")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{gw.port}") as ch:
            call = gateway_pb2_grpc.GatewayStub(ch).Generate(
                gateway_pb2.GenerateRequest(text=PROMPTS[0], params=greedy_pb(400)), timeout=60)
            for i, _ in enumerate(call):
                if i == 3:
                    break
            assert sample(tree_draft, "specsplit_kv_cache_usage_ratio") > 0  # the session (and its branches) live
            call.cancel()
    finally:
        cluster.aio.run(gw.shutdown(0.5))


@pytest.mark.timeout(60)
def test_adopting_an_unknown_branch_is_invalid_argument(tree_draft: TierHandle) -> None:
    from specsplit.proto.v1 import draft_pb2
    from tests.services.conftest import greedy_choice_pb

    def msgs():
        yield draft_pb2.DraftClientMessage(open=draft_pb2.DraftOpen(token_ids=[1, 2, 3, 4], params=greedy_choice_pb()))
        yield draft_pb2.DraftClientMessage(propose=draft_pb2.DraftPropose(round_id=1, prefix_len=4, k=2))
        yield draft_pb2.DraftClientMessage(propose=draft_pb2.DraftPropose(
            round_id=2, prefix_len=6, k=2, branches=draft_pb2.DraftBranches(block_len=2, max_branches=8)))
        yield draft_pb2.DraftClientMessage(propose=draft_pb2.DraftPropose(round_id=3, prefix_len=6, k=2,
                                                                          adopt_branch=999))

    with grpc.insecure_channel(f"127.0.0.1:{tree_draft.port}") as ch:
        call = draft_pb2_grpc.DraftServiceStub(ch).Session(msgs(), timeout=30)
        got = []
        with pytest.raises(grpc.RpcError) as e:
            for m in call:
                got.append(m.proposal)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no branch 999" in e.value.details()
    assert len(got) == 2 and len(got[1].branches) == 3  # 2 runner-ups + the all-accepted guess
    assert {b.accepted for b in got[1].branches} == {0, 1, 2}
    own = next(b for b in got[1].branches if b.accepted == 2)
    assert len(own.token_ids) == 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("branches", "k", "reason"), [
    ((2, 8), 33, "k=33"),  # the session drafts k + 1 for its bonus guess: 32 at most
    ((2, 0), 2, "max_branches"),
    ((2, 65), 2, "max_branches"),
    ((9, 4), 2, "block_len"),  # longer than the session
], ids=["k_too_large", "no_branches", "too_many_branches", "block_longer_than_session"])
def test_a_bad_branch_request_is_invalid_argument(tree_draft: TierHandle, branches: tuple[int, int], k: int,
                                                  reason: str) -> None:
    from specsplit.proto.v1 import draft_pb2
    from tests.services.conftest import greedy_choice_pb

    msgs = [draft_pb2.DraftClientMessage(open=draft_pb2.DraftOpen(token_ids=[1, 2, 3, 4], params=greedy_choice_pb())),
            draft_pb2.DraftClientMessage(propose=draft_pb2.DraftPropose(
                round_id=1, prefix_len=4, k=k,
                branches=draft_pb2.DraftBranches(block_len=branches[0], max_branches=branches[1])))]
    with grpc.insecure_channel(f"127.0.0.1:{tree_draft.port}") as ch, \
            pytest.raises(grpc.RpcError) as e:
        list(draft_pb2_grpc.DraftServiceStub(ch).Session(iter(msgs), timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and reason in e.value.details()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("max_branches", [1, 3])
@pytest.mark.parametrize("round_mode", ["gateway", "direct"])
def test_the_gateways_max_branches_reaches_the_draft_tier(cluster: Cluster, tree_draft: TierHandle,
                                                          reference: Reference, tree_requests: list[tuple[int, int]],
                                                          round_mode: str, max_branches: int) -> None:
    gw = _gateway(cluster, tree_draft, round_mode, max_branches=max_branches)
    try:
        for prompt in PROMPTS[:2]:
            out = stream_text(f"127.0.0.1:{gw.port}", prompt, greedy_pb(32))
            assert out.token_ids == reference.greedy(prompt, 32).token_ids, prompt
    finally:
        cluster.aio.run(gw.shutdown(0.5))
    assert tree_requests, "no block was drafted ahead"
    assert {asked for asked, _ in tree_requests} == {max_branches}
    assert max(got for _, got in tree_requests) == max_branches  # the draft branched, as wide as allowed


@pytest.mark.timeout(180)
@pytest.mark.parametrize("round_mode", ["gateway", "direct"])
def test_branch_metrics_count_rounds_drafted_ahead_and_their_hits(cluster: Cluster, tree_draft: TierHandle,
                                                                  reference: Reference,
                                                                  tree_requests: list[tuple[int, int]],
                                                                  round_mode: str) -> None:
    gw = _gateway(cluster, tree_draft, round_mode)
    try:
        ahead = hits = 0
        for prompt in PROMPTS:
            out = stream_text(f"127.0.0.1:{gw.port}", prompt, greedy_pb(32))
            assert out.token_ids == reference.greedy(prompt, 32).token_ids, prompt
            ahead += out.final.stats.drafted_ahead_rounds
            hits += out.final.stats.pipelined_rounds
        fam = metrics(gw.http_port)
    finally:
        cluster.aio.run(gw.shutdown(0.5))
    assert value(fam, "specsplit_drafted_ahead_rounds_total") == ahead
    assert value(fam, "specsplit_pipelined_rounds_total") == hits
    assert 0 < hits < ahead  # the tiny draft's guesses hit sometimes, not always
    assert value(fam, "specsplit_branch_hit_rate") == pytest.approx(hits / ahead)
    # every speculative propose answered was a round drafted ahead, but the last one of each
    # completion, which may be cancelled when the completion ends first
    assert len(tree_requests) - len(PROMPTS) <= ahead <= len(tree_requests)
@pytest.mark.parametrize("bad", [-1, MAX_BRANCHES + 1])
def test_a_gateway_with_max_branches_out_of_range_is_refused_at_start(cluster: Cluster, bad: int,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match=f"max_branches must be an integer in 0..{MAX_BRANCHES}"):
        GatewayConfig(str(cluster.models.target), spec_config("draft_model", cluster.models),
                      target_addresses=("127.0.0.1:1",), draft_addresses=("127.0.0.1:2",), max_branches=bad)
    assert main(["gateway", str(cluster.models.target), "--target-addresses", "127.0.0.1:1",
                 "--max-branches", str(bad)]) == 2
    assert f"max_branches must be an integer in 0..{MAX_BRANCHES}" in capsys.readouterr().err


def test_specsplit_up_refuses_max_branches_out_of_range_before_starting_anything(
        cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["up", str(cluster.models.target), "--max-branches", str(MAX_BRANCHES + 1)]) == 2
    err = capsys.readouterr().err
    assert f"max_branches must be an integer in 0..{MAX_BRANCHES}" in err and "starting target" not in err


@pytest.mark.timeout(30)
def test_a_direct_start_with_too_many_branches_is_invalid_argument(cluster: Cluster) -> None:
    start = target_pb2.GenerateStart(token_ids=[1, 2], stopping=target_pb2.Stopping(max_new_tokens=4),
                                     max_branches=MAX_BRANCHES + 1)
    with grpc.insecure_channel(f"127.0.0.1:{cluster.target.port}") as ch, pytest.raises(grpc.RpcError) as e:
        list(target_pb2_grpc.TargetServiceStub(ch).Generate(
            iter([target_pb2.GenerateClientMessage(start=start)]), timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_branches" in e.value.details()
