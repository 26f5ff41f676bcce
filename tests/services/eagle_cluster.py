"""EAGLE deployments for the services' tests: a tiny 8-layer target (EAGLE-3 then reads
vLLM's default layers 2, 4 and 5), heads written in the published layouts, and tiers on
127.0.0.1 port 0 whose drafters record every hidden state a propose brought them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from draft_service.config import DraftServiceConfig
from draft_service.server import _load, start_draft
from gateway.config import GatewayConfig
from gateway.server import GatewayHandle, start_gateway
from specsplit import LLM, SamplingParams, SpeculativeConfig
from specsplit.runtime.runner import ModelRunner, StepInput
from specsplit.serving.tier import TierHandle
from specsplit.testing import make_tiny_model
from target_service.config import TargetServiceConfig
from target_service.server import start_target
from tests.services.conftest import KV_BYTES, LoopThread
from tests.speculation.eagle_layouts import write_eagle1, write_eagle3

METHODS = ("eagle", "eagle3")
LAYERS = {"eagle": (8,), "eagle3": (2, 4, 5)}  # what HeadConfig.target_layers gives for 8 target layers


def make_eagle_models(root: Path) -> dict[str, Path]:
    target = make_tiny_model(root / "target8", layers=8, init_std=0.5)
    return {"target": target, "eagle": write_eagle1(root / "e1", target, fmt="bin"),
            "eagle3": write_eagle3(root / "e3", target, list(range(0, 384, 2)), fmt="safetensors")}


def eagle_spec(method: str, models: dict[str, Path], k: int = 3, adaptive: bool = False) -> SpeculativeConfig:
    return SpeculativeConfig(method=method, model=str(models[method]), num_speculative_tokens=k, adaptive=adaptive)


def plain_greedy(target: Path, prompts: list[str], max_tokens: int) -> dict[str, list[int]]:
    """The target alone, in process, no speculation."""
    llm = LLM(str(target), kv_cache_memory_bytes=KV_BYTES)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return {p: llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts}


class Recorder:
    """Wraps a drafter's propose: every (sequence after the update, states) it was handed."""

    def __init__(self, drafter: Any) -> None:
        self.drafter, self.inner = drafter, drafter.propose
        self.seen: list[tuple[list[int], torch.Tensor]] = []

    def __call__(self, reqs: list[Any]) -> list[Any]:
        for r in reqs:
            if r.hidden_states is not None and r.seq_id >= 0:  # not the warm-up
                tokens = self.drafter.sessions[r.seq_id].tokens[: r.prefix_len] + r.new_tokens
                if r.branch is not None:  # drafting ahead: the states end before the block under verify
                    tokens = tokens[: len(tokens) - r.branch.block_len]
                self.seen.append((tokens, r.hidden_states.clone()))
        return self.inner(reqs)


class EagleCluster:
    """One target tier (TP 1 or 2), one recorded draft tier per method, gateways on demand."""

    def __init__(self, aio: LoopThread, models: dict[str, Path], tp: int = 1,
                 methods: tuple[str, ...] = METHODS, drafters: dict[str, Any] | None = None) -> None:
        """`drafters`: a method's drafter object instead of the one its head folder loads."""
        self.aio, self.models = aio, models
        self.target: TierHandle = aio.run(start_target(TargetServiceConfig(
            str(models["target"]), host="127.0.0.1", grpc_port=0, metrics_port=0, kv_cache_memory_bytes=KV_BYTES,
            tensor_parallel_size=tp)), timeout=240)
        self.drafts: dict[str, TierHandle] = {}
        self.recorders: dict[str, Recorder] = {}
        for m in methods:
            cfg = DraftServiceConfig(str(models["target"]), eagle_spec(m, models), host="127.0.0.1", grpc_port=0,
                                     metrics_port=0, kv_cache_memory_bytes=KV_BYTES)
            drafter = (drafters or {}).get(m) or _load(cfg)
            drafter.propose = self.recorders[m] = Recorder(drafter)  # type: ignore[method-assign]
            self.drafts[m] = aio.run(start_draft(cfg, drafter))
        self.gateways: list[GatewayHandle] = []
        self._cached: dict[tuple[str, str], GatewayHandle] = {}

    def gateway(self, method: str, round_mode: str, drafts: tuple[str, ...] = (), adaptive: bool = False,
                **kw: Any) -> GatewayHandle:
        """A gateway over the target tier and `method`'s draft tier (or the `drafts` addresses)."""
        key = (method, round_mode)
        if drafts or kw or adaptive or key not in self._cached:
            gw = self.aio.run(start_gateway(GatewayConfig(
                str(self.models["target"]), eagle_spec(method, self.models, adaptive=adaptive), host="127.0.0.1",
                port=0, grpc_port=0,
                round_mode=round_mode, target_addresses=(f"127.0.0.1:{self.target.port}",),
                draft_addresses=drafts or (f"127.0.0.1:{self.drafts[method].port}",), **kw)))
            self.gateways.append(gw)
            if drafts or kw or adaptive:
                return gw
            self._cached[key] = gw
        return self._cached[key]

    def close(self) -> None:
        for g in self.gateways:
            self.aio.run(g.shutdown(0.5))
        for t in [self.target, *self.drafts.values()]:
            self.aio.run(t.shutdown(0.5))


def reference_states(target: Path, tokens: list[int], layers: tuple[int, ...]) -> torch.Tensor:
    """The target's states at every position of `tokens`, from one prefill, rounded to bf16."""
    runner = ModelRunner.from_folder(target, device="cpu", kv_cache_bytes=KV_BYTES)
    runner.add(0)
    _, states = runner.forward_hidden([StepInput(0, tokens, 1, len(tokens))], layers)
    return states.to(torch.bfloat16).float()


def check_recorded_states(rec: Recorder, target: Path, layers: tuple[int, ...]) -> set[int]:
    """Row i of a propose's n rows must be the target's state at position len(tokens) - 1 - n + i
    (the state that predicted the token after it). Returns the positions covered."""
    full = max((t for t, _ in rec.seen), key=len)
    ref = reference_states(target, full, layers)  # [len(full), D]
    covered: set[int] = set()
    for tokens, states in rec.seen:
        assert tokens == full[: len(tokens)]  # the draft's sequence is the committed one
        n = states.shape[0]
        start = len(tokens) - 1 - n
        assert start >= 0 and states.shape[1] == ref.shape[1]
        torch.testing.assert_close(states.float(), ref[start : start + n], atol=0.05, rtol=0.02)
        covered.update(range(start, start + n))
    return covered


def one_completion_fixtures(name: str, prompt: str, max_tokens: int, method: str) -> tuple[Callable[..., Any], ...]:
    """The module fixtures of a test module that streams one completion through an EAGLE cluster:
    `eagle_models`, `eagle_cluster` (serving `method` only) and `reference` (the target's own
    greedy tokens); assign them to those names in the module."""
    @pytest.fixture(scope="module")
    def eagle_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
        return make_eagle_models(tmp_path_factory.mktemp(name))

    @pytest.fixture(scope="module")
    def eagle_cluster(aio: LoopThread, eagle_models: dict[str, Path]) -> Iterator[EagleCluster]:
        c = EagleCluster(aio, eagle_models, methods=(method,))
        yield c
        c.close()

    @pytest.fixture(scope="module")
    def reference(eagle_models: dict[str, Path]) -> list[int]:
        return plain_greedy(eagle_models["target"], [prompt], max_tokens)[prompt]

    return eagle_models, eagle_cluster, reference

