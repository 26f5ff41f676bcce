"""The shared round as its drivers use it: seeded requests stay reproducible in both.

Adaptive k picks the block length from measured step times, and how many random numbers a
round draws depends on the block length; so a seeded sampled request must keep k fixed, or
the same request would give other tokens whenever the timings differ.
"""

from __future__ import annotations

import pytest

from specsplit import SamplingParams
from specsplit.speculation.adaptive import CostModel, Ema

K = 3


def _costs(draft_step_s: float) -> CostModel:
    """A cost model as if measured: verify 10 ms at every k, one draft step `draft_step_s`."""
    return CostModel(draft_step=Ema(draft_step_s), verify={k: Ema(0.010) for k in range(K + 1)}, seen_draft=True)


@pytest.fixture
def frozen_costs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the cost model each test sets: no step time measured during a run updates it."""
    monkeypatch.setattr(CostModel, "observe_draft", lambda self, s: None)
    monkeypatch.setattr(CostModel, "observe_verify", lambda self, k, s, **kw: None)


def test_seeded_sampled_request_same_tokens_whatever_the_timings(make_llm, tiny_target, tiny_draft, frozen_costs):
    llm = make_llm(tiny_target, {"method": "draft_model", "model": str(tiny_draft), "num_speculative_tokens": K,
                                 "adaptive": True})
    seeded = SamplingParams(n=2, temperature=1.0, top_p=0.95, max_tokens=24, ignore_eos=True, seed=11)

    def run(draft_step_s: float) -> tuple[list[list[int]], int]:
        llm.engine.costs = _costs(draft_step_s)
        out = llm.generate(["def fibonacci(n):"], seeded, use_tqdm=False)[0]
        return [c.token_ids for c in out.outputs], out.metrics.num_drafted_tokens

    cheap, cheap_drafted = run(1e-5)  # drafting is nearly free: adaptive k would pick k_max
    dear, dear_drafted = run(1.0)  # a draft step costs 100 verifies: adaptive k would pick 0
    assert cheap == dear
    assert cheap_drafted == dear_drafted > 0  # the same blocks were drafted both times


def test_unseeded_request_still_adapts_k_to_the_timings(make_llm, tiny_target, tiny_draft, frozen_costs):
    """The other side of the rule: without a seed, k follows the costs (here: drafting too dear)."""
    llm = make_llm(tiny_target, {"method": "draft_model", "model": str(tiny_draft), "num_speculative_tokens": K,
                                 "adaptive": True})
    params = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True)
    llm.engine.costs = _costs(1e-5)
    cheap = llm.generate(["def fibonacci(n):"], params, use_tqdm=False)[0].metrics.num_drafted_tokens
    llm.engine.costs = _costs(1.0)
    dear = llm.generate(["def fibonacci(n):"], params, use_tqdm=False)[0].metrics.num_drafted_tokens
    assert dear < cheap


def test_served_loop_keeps_k_fixed_for_a_seeded_request_as_the_engine_does():
    """The served loop takes its k from the same round book: fixed when seeded, adaptive when not,
    counted into the loop's own statistics (the gateway reports those)."""
    from specsplit.proto.v1 import draft_pb2_grpc, target_pb2_grpc
    from specsplit.serving.completion_loop import CompletionLoop, LoopOptions
    from specsplit.serving.replicas import ReplicaPool
    from specsplit.speculation.sequence import Sequence

    def loop(seed: int | None) -> CompletionLoop:
        seq = Sequence(0, [5, 6, 7], SamplingParams(temperature=1.0, max_tokens=20, seed=seed), (0,), 64)
        return CompletionLoop(seq, ReplicaPool("target", target_pb2_grpc.TargetServiceStub),
                              ReplicaPool("draft", draft_pb2_grpc.DraftServiceStub), _costs(1.0),
                              LoopOptions(num_speculative_tokens=K, adaptive=True))

    seeded, unseeded = loop(3), loop(None)
    assert seeded.book.choose_k(seeded.costs, drafting=True) == K  # drafting looks dear, yet k stays
    assert unseeded.book.choose_k(unseeded.costs, drafting=True) == 0
    assert seeded.book.metrics is seeded.stats
