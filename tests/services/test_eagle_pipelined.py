"""EAGLE rounds drafted ahead through the real services: while the target tier verifies a
block, the draft tier's head guesses that all of it is accepted and drafts the next block from
its own state; the states of the verified round follow with the next request.

A random head's guesses are almost never right, so the head here is the benchmark oracle's
(benchmarks/oracle_eagle.py): every head step runs for real, but each token it proposes is the
target's own with probability alpha. Output must stay token-identical to the target alone.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from specsplit import LLM, SamplingParams
from tests.services.conftest import KV_BYTES, LoopThread, greedy_pb, stream_text
from tests.services.eagle_cluster import (
    EagleCluster,
    check_recorded_states,
    make_eagle_models,
    plain_greedy,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # oracle_eagle imports `oracle`
from benchmarks.oracle_eagle import OracleEagleDrafter, random_eagle3_drafter, write_head_config  # noqa: E402

PROMPTS = ["def fibonacci(n):", "The quick brown fox"]
MAX_TOKENS = 40
SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings")


class SelfReferencedOracle:
    """Gives an oracle head, at each session's open, the target's own greedy continuation of it."""

    def __init__(self, drafter: OracleEagleDrafter, target: Path) -> None:
        self.llm = LLM(str(target), kv_cache_memory_bytes=KV_BYTES)
        self.pairs: list[tuple[list[int], list[int]]] = []
        inner = drafter._on_open

        def on_open(seq_id: int) -> None:
            tokens = list(drafter.sessions[seq_id].tokens)
            if seq_id >= 0 and tuple(tokens) not in drafter._by_prompt:
                out = self.llm.generate([{"prompt_token_ids": tokens}], SamplingParams(
                    max_tokens=MAX_TOKENS + 8, temperature=0.0, ignore_eos=True), use_tqdm=False)
                self.pairs.append((tokens, list(out[0].outputs[0].token_ids)))
                drafter.set_references(self.pairs)
            inner(seq_id)

        drafter._on_open = on_open  # type: ignore[method-assign]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eagle-pipelined")
    m = make_eagle_models(root)
    shape = {k: v for k, v in json.loads((m["target"] / "config.json").read_text()).items() if k in SHAPE_KEYS}
    m["eagle3"] = write_head_config(root / "oracle-head", shape)  # the gateway reads the layers from it
    m["shape"] = shape  # type: ignore[assignment]
    return m


@pytest.fixture(scope="module")
def oracle(models: dict[str, Any]) -> OracleEagleDrafter:
    d = random_eagle3_drafter(models["shape"], torch.device("cpu"), torch.float32, max_model_len=1024,
                              kv_cache_bytes=KV_BYTES)
    SelfReferencedOracle(d, models["target"])
    return d


@pytest.fixture(scope="module")
def eagle_cluster(aio: LoopThread, models: dict[str, Any], oracle: OracleEagleDrafter) -> Iterator[EagleCluster]:
    c = EagleCluster(aio, models, methods=("eagle3",), drafters={"eagle3": oracle})
    yield c
    c.close()


@pytest.fixture(scope="module")
def plain(models: dict[str, Any]) -> dict[str, list[int]]:
    return plain_greedy(models["target"], PROMPTS, MAX_TOKENS)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("round_mode", ["direct", "gateway"])
@pytest.mark.parametrize("alpha", [1.0, 0.8])
def test_rounds_drafted_ahead_hit_and_the_output_equals_the_target_alone(
        eagle_cluster: EagleCluster, oracle: OracleEagleDrafter, plain, models, alpha: float, round_mode: str):
    oracle.set_alpha(alpha)
    rec = eagle_cluster.recorders["eagle3"]
    gw = eagle_cluster.gateway("eagle3", round_mode)
    ahead = hits = 0
    for prompt in PROMPTS:
        rec.seen.clear()
        out = stream_text(f"127.0.0.1:{gw.port}", prompt, greedy_pb(MAX_TOKENS), timeout=120)
        assert out.token_ids == plain[prompt], (alpha, round_mode, prompt)
        ahead += out.final.stats.drafted_ahead_rounds
        hits += out.final.stats.pipelined_rounds
        # the states that rode on requests drafted ahead were the target's, at the right positions
        check_recorded_states(rec, models["target"], (2, 4, 5))
    assert ahead > 0 and hits > 0  # blocks were drafted ahead, and some of them were taken
    if alpha == 1.0:
        assert hits >= ahead // 2  # every guess holds but where the block was cut to the room left


@pytest.mark.timeout(240)
@pytest.mark.parametrize("round_mode", ["direct", "gateway"])
def test_probe_after_plain_rounds_drafts_beside_the_verify(
        eagle_cluster: EagleCluster, oracle: OracleEagleDrafter, plain, models, round_mode: str,
        monkeypatch: pytest.MonkeyPatch):
    """Adaptive k at 0 for a while, then drafting again: the head catches up on the skipped
    tokens (with their states) beside a verify, guessing its token; output and states exact."""
    from specsplit.serving.completion_loop import CompletionLoop
    from specsplit.speculation.adaptive import AdaptiveK

    oracle.set_alpha(0.8)
    rec = eagle_cluster.recorders["eagle3"]
    gw = eagle_cluster.gateway("eagle3", round_mode, adaptive=True)
    plan = iter(([0] * 5 + [2] * 3) * 40)
    monkeypatch.setattr(AdaptiveK, "choose", lambda self, costs, limit: min(next(plan), limit))
    calls: list[tuple[int, int | None]] = []
    real_propose = CompletionLoop._propose

    async def propose(self, prefix_len, new_tokens, k, block_len=None):
        calls.append((len(new_tokens), block_len))
        return await real_propose(self, prefix_len, new_tokens, k, block_len)

    monkeypatch.setattr(CompletionLoop, "_propose", propose)
    hits = 0
    for prompt in PROMPTS:
        rec.seen.clear()
        out = stream_text(f"127.0.0.1:{gw.port}", prompt, greedy_pb(MAX_TOKENS), timeout=120)
        assert out.token_ids == plain[prompt], (round_mode, prompt)
        hits += out.final.stats.pipelined_rounds
        check_recorded_states(rec, models["target"], (2, 4, 5))
    catch_ups = [b for n, b in calls if n > 1]
    assert catch_ups and all(b == 0 for b in catch_ups), calls
    assert hits > 0
