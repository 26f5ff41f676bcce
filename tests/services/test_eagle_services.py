"""EAGLE over the split: the target tier returns the hidden states of the positions it
accepted, the draft tier's head drafts from them. Real gRPC servers on port 0, a tiny random
8-layer target (EAGLE-3 reads layers 2, 4 and 5) and heads written in the published layouts.

Greedy output must be token-identical to the target alone in both rounds (direct: the target
tier dials the draft tier; gateway: the gateway relays), with the target on one process and
sharded over two (gloo). The states themselves are checked against the target's own: each
propose must carry exactly the states of the positions that precede its last tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from draft_service.config import DraftServiceConfig
from draft_service.server import start_draft
from gateway.config import GatewayConfig
from gateway.server import GatewayHandle, start_gateway
from specsplit import LLM, SamplingParams, SpeculativeConfig
from specsplit.proto.v1 import common_pb2
from specsplit.runtime.runner import ModelRunner, StepInput
from specsplit.serving.tier import TierHandle
from specsplit.speculation.eagle.wire import bytes_per_token, pack_states, unpack_states
from specsplit.testing import make_tiny_model
from target_service.config import TargetServiceConfig
from target_service.server import start_target
from tests.services.conftest import KV_BYTES, LoopThread, greedy_pb, stream_text
from tests.speculation.eagle_layouts import write_eagle1, write_eagle3

PROMPTS = ["def fibonacci(n):", "The quick brown fox", "la la la la la"]
MAX_TOKENS = 24
METHODS = ("eagle", "eagle3")
LAYERS = {"eagle": (8,), "eagle3": (2, 4, 5)}  # what HeadConfig.target_layers gives for 8 target layers


@pytest.fixture(scope="module")
def eagle_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eagle-services")
    target = make_tiny_model(root / "target8", layers=8, init_std=0.5)
    return {"target": target, "eagle": write_eagle1(root / "e1", target, fmt="bin"),
            "eagle3": write_eagle3(root / "e3", target, list(range(0, 384, 2)), fmt="safetensors")}


def eagle_spec(method: str, models: dict[str, Path], k: int = 3) -> SpeculativeConfig:
    return SpeculativeConfig(method=method, model=str(models[method]), num_speculative_tokens=k, adaptive=False)


@pytest.fixture(scope="module")
def plain(eagle_models: dict[str, Path]) -> dict[str, list[int]]:
    llm = LLM(str(eagle_models["target"]), kv_cache_memory_bytes=KV_BYTES)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return {p: llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS}


class Recorder:
    """Wraps a drafter's propose: every (sequence after the update, states) it was handed."""

    def __init__(self, drafter: Any) -> None:
        self.drafter, self.inner = drafter, drafter.propose
        self.seen: list[tuple[list[int], torch.Tensor]] = []

    def __call__(self, reqs: list[Any]) -> list[Any]:
        for r in reqs:
            if r.hidden_states is not None and r.seq_id >= 0:  # not the warm-up
                tokens = self.drafter.sessions[r.seq_id].tokens[: r.prefix_len] + r.new_tokens
                self.seen.append((tokens, r.hidden_states.clone()))
        return self.inner(reqs)


class EagleCluster:
    """One target tier (TP 1 or 2), one draft tier per method, gateways per round mode."""

    def __init__(self, aio: LoopThread, models: dict[str, Path], tp: int) -> None:
        from draft_service.server import _load

        self.aio, self.models = aio, models
        self.target: TierHandle = aio.run(start_target(TargetServiceConfig(
            str(models["target"]), host="127.0.0.1", grpc_port=0, metrics_port=0, kv_cache_memory_bytes=KV_BYTES,
            tensor_parallel_size=tp)), timeout=240)
        self.drafts: dict[str, TierHandle] = {}
        self.recorders: dict[str, Recorder] = {}
        for m in METHODS:
            cfg = DraftServiceConfig(str(models["target"]), eagle_spec(m, models), host="127.0.0.1", grpc_port=0,
                                     metrics_port=0, kv_cache_memory_bytes=KV_BYTES)
            drafter = _load(cfg)
            drafter.propose = self.recorders[m] = Recorder(drafter)  # type: ignore[method-assign]
            self.drafts[m] = aio.run(start_draft(cfg, drafter))
        self.gateways: dict[tuple, GatewayHandle] = {}

    def gateway(self, method: str, round_mode: str) -> GatewayHandle:
        if (method, round_mode) not in self.gateways:
            self.gateways[method, round_mode] = self.aio.run(start_gateway(GatewayConfig(
                str(self.models["target"]), eagle_spec(method, self.models), host="127.0.0.1", port=0, grpc_port=0,
                round_mode=round_mode, target_addresses=(f"127.0.0.1:{self.target.port}",),
                draft_addresses=(f"127.0.0.1:{self.drafts[method].port}",))))
        return self.gateways[method, round_mode]

    def close(self) -> None:
        for g in self.gateways.values():
            self.aio.run(g.shutdown(0.5))
        for t in [self.target, *self.drafts.values()]:
            self.aio.run(t.shutdown(0.5))


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


def reference_states(target: Path, tokens: list[int], layers: tuple[int, ...]) -> torch.Tensor:
    """The target's states at every position of `tokens`, computed in one prefill, in bf16."""
    runner = ModelRunner.from_folder(target, device="cpu", kv_cache_bytes=KV_BYTES)
    runner.add(0)
    _, states = runner.forward_hidden([StepInput(0, tokens, 1, len(tokens))], layers)
    return states.to(torch.bfloat16).float()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("round_mode", ["direct", "gateway"])
@pytest.mark.parametrize("method", METHODS)
def test_each_propose_carries_the_targets_states_of_the_right_positions(
        eagle_cluster: EagleCluster, eagle_models, method, round_mode):
    """Row i of a propose's n rows must be the target's state at position len(tokens) - 1 - n + i
    (the state that predicted the token after it), and together they must cover every position."""
    rec = eagle_cluster.recorders[method]
    rec.seen.clear()
    gw = eagle_cluster.gateway(method, round_mode)
    stream_text(f"127.0.0.1:{gw.port}", PROMPTS[0], greedy_pb(MAX_TOKENS), timeout=120)
    assert rec.seen
    full = max((t for t, _ in rec.seen), key=len)
    ref = reference_states(eagle_models["target"], full, LAYERS[method])  # [len(full), D]
    covered: set[int] = set()
    for tokens, states in rec.seen:
        assert tokens == full[: len(tokens)]  # the draft's sequence is the committed one
        n = states.shape[0]
        start = len(tokens) - 1 - n
        assert start >= 0 and states.shape[1] == ref.shape[1]
        torch.testing.assert_close(states.float(), ref[start : start + n], atol=0.05, rtol=0.02)
        covered.update(range(start, start + n))
    assert covered == set(range(len(full) - 1))  # every position, from the prompt's first on


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
        states = torch.randn(5, 4096 * layers)
        data = pack_states(states)
        assert len(data) == 5 * bytes_per_token(4096, layers)
        back = unpack_states(data, 4096 * layers)
        assert torch.equal(back, states.to(torch.bfloat16))
