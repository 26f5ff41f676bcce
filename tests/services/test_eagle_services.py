"""EAGLE over the split: the target tier returns the hidden states of the positions it
accepted, the draft tier's head drafts from them (tests/services/eagle_cluster.py).

Greedy output must be token-identical to the target alone in both rounds (direct: the target
tier dials the draft tier; gateway: the gateway relays), with the target on one process and
sharded over two (gloo). The states themselves are checked against the target's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from specsplit.proto.v1 import common_pb2, draft_pb2, target_pb2
from specsplit.speculation.eagle.wire import bytes_per_token, pack_states, unpack_states
from tests.services.conftest import LoopThread, greedy_pb, stream_text
from tests.services.eagle_cluster import (
    LAYERS,
    METHODS,
    EagleCluster,
    check_recorded_states,
    make_eagle_models,
    plain_greedy,
)

PROMPTS = ["def fibonacci(n):", "The quick brown fox", "la la la la la"]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def eagle_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_eagle_models(tmp_path_factory.mktemp("eagle-services"))


@pytest.fixture(scope="module")
def plain(eagle_models: dict[str, Path]) -> dict[str, list[int]]:
    return plain_greedy(eagle_models["target"], PROMPTS, MAX_TOKENS)


@pytest.fixture(scope="module")
def eagle_cluster(aio: LoopThread, eagle_models: dict[str, Path]) -> Iterator[EagleCluster]:
    c = EagleCluster(aio, eagle_models, tp=1)
    yield c
    c.close()


def check_greedy(c: EagleCluster, plain: dict[str, list[int]], method: str, round_mode: str) -> None:
    gw = c.gateway(method, round_mode)
    drafted = 0
    for prompt in PROMPTS:
        out = stream_text(f"127.0.0.1:{gw.port}", prompt, greedy_pb(MAX_TOKENS), timeout=120)
        assert out.token_ids == plain[prompt], (method, round_mode, prompt)
        drafted += out.final.stats.drafted_tokens
    assert drafted > 0  # the head drafted, from states that crossed the wire


@pytest.mark.timeout(240)
@pytest.mark.parametrize("round_mode", ["direct", "gateway"])
@pytest.mark.parametrize("method", METHODS)
def test_greedy_through_the_services_equals_the_target_alone(eagle_cluster: EagleCluster, plain, method, round_mode):
    check_greedy(eagle_cluster, plain, method, round_mode)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("round_mode", ["direct", "gateway"])
@pytest.mark.parametrize("method", METHODS)
def test_each_propose_carries_the_targets_states_of_the_right_positions(
        eagle_cluster: EagleCluster, eagle_models, method, round_mode):
    """The states each propose brings are the target's at the positions before its last
    tokens, and together they cover every position from the prompt's first on."""
    rec = eagle_cluster.recorders[method]
    rec.seen.clear()
    gw = eagle_cluster.gateway(method, round_mode)
    stream_text(f"127.0.0.1:{gw.port}", PROMPTS[0], greedy_pb(MAX_TOKENS), timeout=120)
    assert rec.seen
    covered = check_recorded_states(rec, eagle_models["target"], LAYERS[method])
    assert covered == set(range(max(len(t) for t, _ in rec.seen) - 1))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("round_mode", ["direct", "gateway"])
def test_sampled_session_runs_through_the_services(eagle_cluster: EagleCluster, round_mode):
    gw = eagle_cluster.gateway("eagle3", round_mode)
    params = common_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, top_p=0.95, seed=7, ignore_eos=True)
    out = stream_text(f"127.0.0.1:{gw.port}", PROMPTS[1], params, timeout=120)
    assert len(out.token_ids) == MAX_TOKENS
    assert out.final.stats.drafted_tokens > 0


def test_wire_bytes_per_token_for_the_8b_shape():
    """Llama-3.1-8B: 4096-wide states, bf16 on the wire: 8 KiB (EAGLE-1), 24 KiB (EAGLE-3)."""
    assert bytes_per_token(4096, 1) == 8 * 1024
    assert bytes_per_token(4096, 3) == 24 * 1024
    for layers in (1, 3):
        states = torch.randn(5, 4096 * layers)  # a round that accepted 4 drafts: 5 positions
        data = pack_states(states)
        assert len(data) == 5 * bytes_per_token(4096, layers)
        assert torch.equal(unpack_states(data, 4096 * layers), states.to(torch.bfloat16))
        # on the wire: the verify result and the next propose each carry the bytes, plus a few for framing
        result = target_pb2.VerifyResult(round_id=9, num_accepted=4, next_token=17, hidden_states=data)
        propose = draft_pb2.DraftPropose(round_id=9, prefix_len=100, new_tokens=[17], k=5, hidden_states=data)
        for msg in (result, propose):
            assert 0 < msg.ByteSize() - 5 * bytes_per_token(4096, layers) < 24


@pytest.mark.timeout(600)
def test_tensor_parallel_2_target_greedy_equals_the_target_alone(aio: LoopThread, eagle_models, plain):
    """The target tier sharded over two processes (gloo): rank 0 gathers the states it returns."""
    c = EagleCluster(aio, eagle_models, tp=2)
    try:
        for method in METHODS:
            for round_mode in ("direct", "gateway"):
                check_greedy(c, plain, method, round_mode)
    finally:
        c.close()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("round_mode", ["direct", "gateway"])
def test_states_past_the_message_cap_keep_the_newest_rows_and_stay_lossless(
        eagle_cluster: EagleCluster, monkeypatch, round_mode):
    """A long prompt's states would overflow one gRPC message: the newest rows that fit are sent
    (here 8 rows of EAGLE-3's 3 x 64 bf16 values), the head starts from there, output unchanged."""
    from specsplit.speculation.eagle import wire

    monkeypatch.setattr(wire, "MAX_STATES_BYTES", 8 * 3 * 64 * 2)
    prompt = "la la la " * 12
    plain_ids = plain_greedy(eagle_cluster.models["target"], [prompt], MAX_TOKENS)[prompt]
    rec = eagle_cluster.recorders["eagle3"]
    rec.seen.clear()
    out = stream_text(f"127.0.0.1:{eagle_cluster.gateway('eagle3', round_mode).port}", prompt, greedy_pb(MAX_TOKENS),
                      timeout=120)
    assert out.token_ids == plain_ids and out.final.stats.drafted_tokens > 0
    assert rec.seen and all(states.shape[0] <= 8 for _, states in rec.seen)
    first_tokens, first_states = rec.seen[0]
    assert len(first_tokens) > 20 and len(first_tokens) - 1 - first_states.shape[0] > 0  # the prompt's tail only
    check_recorded_states(rec, eagle_cluster.models["target"], LAYERS["eagle3"])
