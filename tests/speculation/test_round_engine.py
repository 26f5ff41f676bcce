"""The shared round as the in-process engine drives it: seeded requests stay reproducible.

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
