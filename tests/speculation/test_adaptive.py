"""Adaptive block length: E(k) and the k that maximises tokens per second."""

import pytest

from specsplit.speculation.adaptive import Acceptance, AdaptiveK, CostModel, expected_tokens


def _costs(draft_step: float, verify: dict[int, float]) -> CostModel:
    costs = CostModel()
    costs.observe_draft(draft_step)
    for k, t in verify.items():
        costs.observe_verify(k, t)
    return costs


def _adaptive(alpha: float, k_max: int = 5) -> AdaptiveK:
    return AdaptiveK(k_max, alpha=Acceptance.prior(alpha))


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8, 0.95])
@pytest.mark.parametrize("k", [0, 1, 5, 8])
def test_expected_tokens_is_geometric_sum(alpha, k):
    # a round emits the accepted prefix (token i accepted with prob alpha^i) plus one token
    assert expected_tokens(alpha, k) == pytest.approx(sum(alpha**i for i in range(k + 1)))


def test_expected_tokens_known_values():
    assert expected_tokens(0.8, 5) == pytest.approx((1 - 0.8**6) / 0.2)  # 3.69 (docs/architecture.md)
    assert expected_tokens(1.0, 5) == 6.0
    assert expected_tokens(0.0, 5) == 1.0


def test_choose_zero_when_acceptance_low_and_draft_costly():
    costs = _costs(draft_step=0.010, verify={0: 0.010, 5: 0.012})
    assert _adaptive(0.1).choose(costs, limit=100) == 0


def test_choose_full_k_when_acceptance_high_and_draft_cheap():
    costs = _costs(draft_step=0.0005, verify={0: 0.010, 5: 0.011})
    assert _adaptive(0.95).choose(costs, limit=100) == 5


def test_choose_middle_k_when_gains_flatten():
    # alpha 0.6: E(k) saturates at 2.5, so long blocks only add draft time
    costs = _costs(draft_step=0.003, verify={0: 0.010, 5: 0.010})
    k = _adaptive(0.6).choose(costs, limit=100)
    assert 0 < k < 5
    rates = [expected_tokens(0.6, j) / (0.010 + j * 0.003) for j in range(6)]
    assert rates[k] >= max(rates) / 1.03


def test_choose_full_k_until_costs_are_measured():
    assert _adaptive(0.1).choose(CostModel(), limit=100) == 5
    costs = CostModel()
    costs.observe_verify(0, 0.01)  # verify measured, draft not yet
    assert _adaptive(0.1).choose(costs, limit=100) == 5


def test_choose_respects_limit_and_disabled():
    costs = _costs(draft_step=0.0005, verify={0: 0.010, 5: 0.011})
    assert _adaptive(0.95).choose(costs, limit=2) == 2
    assert _adaptive(0.95).choose(costs, limit=0) == 0
    assert AdaptiveK(5, enabled=False, alpha=Acceptance.prior(0.0)).choose(costs, limit=100) == 5
    assert AdaptiveK(5, enabled=False).choose(costs, limit=3) == 3


def test_zero_k_probes_with_one_at_doubling_intervals():
    costs = _costs(draft_step=0.010, verify={0: 0.010, 5: 0.012})
    ad = _adaptive(0.05)
    picks = [ad.choose(costs, limit=100) for _ in range(2000)]
    assert set(picks) == {0, 1}
    probes = [i for i, k in enumerate(picks) if k == 1]
    gaps = [b - a for a, b in zip([-1, *probes], probes, strict=False)]
    assert gaps[:6] == [16, 32, 64, 128, 256, 256]  # each probe that changes nothing doubles the wait
    assert max(gaps) == 256


def test_probe_interval_resets_once_drafting_pays_again():
    costs = _costs(draft_step=0.010, verify={0: 0.010, 5: 0.012})
    ad = _adaptive(0.05)
    for _ in range(16 + 32 + 64):
        ad.choose(costs, limit=100)
    assert ad.probe_every == 128
    ad.alpha = Acceptance.prior(0.99)  # acceptance came back
    cheap = _costs(draft_step=0.0005, verify={0: 0.010, 5: 0.011})
    assert ad.choose(cheap, limit=100) == 5
    assert ad.probe_every == 16 and ad.zero_rounds == 0


def test_observe_tracks_acceptance():
    ad = _adaptive(0.7)
    for _ in range(30):
        ad.observe(5, 0)
    assert ad.alpha.value < 0.01
    for _ in range(30):
        ad.observe(5, 5)
    assert ad.alpha.value > 0.99
    before = ad.alpha.value
    ad.observe(0, 0)  # nothing drafted: no evidence
    assert ad.alpha.value == before


def test_round_time_is_verify_plus_k_draft_steps():
    costs = _costs(draft_step=0.001, verify={1: 0.010, 8: 0.017})
    assert costs.round_time(3) == pytest.approx(0.012 + 3 * 0.001)
    assert CostModel().round_time(0) is None


def test_engine_does_not_count_a_draft_catch_up_as_draft_cost(make_llm, tiny_target, tiny_draft, monkeypatch):
    """After rounds with k = 0 the drafter first catches up on the skipped tokens.

    That call is slow for reasons other than drafting; if it were recorded as the draft's
    per-step cost, k would stay at 0 for good. Here the catch-up is made slow on purpose and
    the recorded draft costs must not see it.
    """
    import time

    from specsplit import SamplingParams

    llm = make_llm(tiny_target, {"method": "draft_model", "model": str(tiny_draft),
                                 "num_speculative_tokens": 3, "adaptive": True})
    engine = llm.engine
    k_max = engine.k_max
    plan = iter([0] * 8 + [1] * 100)  # 8 rounds without drafting, then drafting resumes
    monkeypatch.setattr(AdaptiveK, "choose", lambda self, costs, limit: min(next(plan), limit))
    real_propose = engine.drafter.propose

    def propose(reqs):
        if max(len(q.new_tokens) for q in reqs) > k_max + 1:
            time.sleep(1.0)  # the catch-up: much dearer than any draft step of a tiny model, even on a busy CPU
        return real_propose(reqs)

    monkeypatch.setattr(engine.drafter, "propose", propose)
    seen: list[float] = []
    real_observe = engine.costs.observe_draft
    monkeypatch.setattr(engine.costs, "observe_draft", lambda s: (seen.append(s), real_observe(s)))
    out = llm.generate(["def f(x):"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 20
    assert out[0].metrics.num_drafted_tokens > 0  # drafting did resume
    assert seen, "plain draft steps after the catch-up are measured"
    assert max(seen) < 0.5, seen


def _rounds(alpha: float, k: int, n: int, seed: int = 0) -> list[int]:
    """Accepted counts of n rounds of k drafted tokens, each accepted with probability alpha."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a = 0
        while a < k and rng.random() < alpha:
            a += 1
        out.append(a)
    return out


@pytest.mark.parametrize("alpha", [0.3, 0.6, 0.8, 0.9])
def test_acceptance_estimate_is_unbiased_for_geometric_rounds(alpha):
    est = Acceptance.prior(0.7)
    values = []
    for a in _rounds(alpha, 5, 3000):
        est.update(5, a)
        values.append(est.value)
    mean = sum(values[100:]) / len(values[100:])
    assert mean == pytest.approx(alpha, abs=0.04)
    # the per-round ratio a/d that this replaced reads far too low at high acceptance
    if alpha >= 0.8:
        naive = [a / 5 if a < 5 else 1.0 for a in _rounds(alpha, 5, 3000)]
        assert sum(naive) / len(naive) < alpha - 0.1


def test_one_early_rejection_does_not_stop_drafting():
    ad = _adaptive(0.7)
    for _ in range(10):
        ad.observe(5, 5)
    ad.observe(5, 0)  # one block rejected at its first token
    assert ad.alpha.value > 0.8
    costs = _costs(draft_step=0.003, verify={0: 0.010, 5: 0.015})  # CPU-like: a draft step is 1/3 of a step
    assert ad.choose(costs, limit=100) >= 2


def test_accepted_probe_resets_the_probe_interval():
    ad = _adaptive(0.05)
    costs = _costs(draft_step=0.010, verify={0: 0.010, 5: 0.012})
    for _ in range(16 + 32):
        ad.choose(costs, limit=100)
    assert ad.probe_every == 64
    ad.observe(1, 0)  # a rejected probe changes nothing
    assert ad.probe_every == 64
    ad.observe(1, 1)
    assert ad.probe_every == 16


def test_verify_time_interpolates_between_measured_block_lengths():
    costs = _costs(draft_step=0.001, verify={0: 0.010, 5: 0.020})
    assert costs.verify_time(0) == 0.010 and costs.verify_time(5) == 0.020
    assert costs.verify_time(2) == pytest.approx(0.014)  # not the nearest (0.010)
    assert costs.verify_time(4) == pytest.approx(0.018)
    assert costs.verify_time(8) == 0.020  # beyond the measured range: the nearest
    only_high = _costs(draft_step=0.001, verify={3: 0.012})
    assert only_high.verify_time(1) == 0.012 and only_high.verify_time(5) == 0.012
    assert CostModel().verify_time(3) is None


def test_a_served_draft_calls_fixed_overhead_is_not_spread_over_its_steps():
    """Served: a 5-token EAGLE block costs 2.25 ms in the draft tier plus 2.5 ms of RPC and tier
    code whatever k is, the verify 7.6 ms. At alpha 0.8 the full block is best; counting the
    overhead as per-step cost would make each step look twice as dear and choose k = 4."""
    costs = CostModel()
    for k in (5, 6):
        costs.observe_verify(k, 7.6e-3)
    costs.observe_draft_call(4.75e-3, 5, 1, 5, step_seconds=2.25e-3)
    assert costs.round_time(0) == pytest.approx(7.6e-3)  # no draft call at all
    assert costs.round_time(5) == pytest.approx(7.6e-3 + 2.5e-3 + 5 * 0.45e-3)
    a = AdaptiveK(k_max=5, alpha=Acceptance.prior(0.8, weight=100))
    assert a.choose(costs, 5) == 5
    folded = CostModel(verify=costs.verify)
    folded.observe_draft_call(4.75e-3, 5, 1, 5)  # the whole call as steps: what an in-process drafter reports
    assert a.choose(folded, 5) == 4


def test_a_block_drafted_ahead_ends_within_the_verify_it_runs_beside():
    """Draft model: 1.5 ms a step beside a 7.5 ms verify: 4 ahead (+ the bonus guess) fit, 5 do
    not, and a miss would wait for the guess to end. A cheap head drafts the full block."""
    costs = _costs(draft_step=1.5e-3, verify={5: 7.5e-3})
    assert costs.ahead_k(5, 5) == 4
    assert _costs(draft_step=0.45e-3, verify={5: 7.5e-3}).ahead_k(5, 5) == 5
    assert _costs(draft_step=5e-3, verify={5: 7.5e-3}).ahead_k(5, 5) == 0  # not even one fits: no guess
    assert CostModel().ahead_k(5, 5) == 5  # unmeasured


def test_a_lone_spike_is_ignored_and_a_lasting_one_is_learned():
    """A draft step that captured a CUDA graph (50x a step) does not make drafting look dear;
    the same cost three times in a row is the new cost."""
    costs = _costs(draft_step=1e-3, verify={5: 7.5e-3})
    costs.observe_draft(50e-3)
    assert costs.draft_step.value == pytest.approx(1e-3)
    costs.observe_draft(1.2e-3)
    assert costs.draft_step.value == pytest.approx(1.04e-3)
    for _ in range(3):
        costs.observe_draft(10e-3)
    assert costs.draft_step.value > 2e-3


def test_waiting_for_the_block_drafted_ahead_counts_against_drafting():
    """Served at load, the draft tier's batched passes can outlast the target's step: the round
    then waits for its block after the verify. That wait makes drafting dearer, down to k = 0."""
    costs = _costs(draft_step=0.001, verify={0: 0.010, 5: 0.011})
    ad = _adaptive(0.7)
    assert ad.choose(costs, limit=100) > 0
    for _ in range(30):
        costs.observe_ahead_wait(0.030)  # three steps' worth, every round
    assert costs.round_time(0) == pytest.approx(0.010)  # a plain round waits for no draft
    assert ad.choose(costs, limit=100) == 0


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _serve(gov, clock: _Clock, seconds: float, rate: dict[bool, float], dt: float = 0.01) -> list[bool]:
    """Run the governor's sessions for `seconds`: each round (dt) every running completion
    commits tokens at the rate of the mode it is in. Returns the mode of each round."""
    modes = []
    for _ in range(int(seconds / dt)):
        clock.t += dt
        on = gov.allows_drafting()
        modes.append(on)
        for _ in range(gov.active):
            gov.record(round(rate[on] * dt))
    return modes


def test_load_governor_turns_drafting_off_where_it_costs_throughput():
    from specsplit.speculation.adaptive import LoadGovernor

    clock = _Clock()
    gov = LoadGovernor(clock=clock)
    for _ in range(16):
        gov.enter()
    modes = _serve(gov, clock, 40.0, {True: 700, False: 1000})  # plain is faster at this load
    late = modes[len(modes) // 2:]
    assert sum(late) / len(late) < 0.1  # drafting only in the epochs that re-check it, ever rarer
    assert sum(late) > 0  # ...which do happen: the load may change
    assert gov.epochs[True] >= 3 and gov.epochs[False] > 4 * gov.epochs[True]
    # where drafting starts to pay, a re-check finds it and the governor turns drafting back on
    modes = _serve(gov, clock, 40.0, {True: 1500, False: 1000})
    late = modes[len(modes) // 2:]
    assert sum(late) / len(late) > 0.9
    gov.fixed = False  # an operator's override
    assert not any(_serve(gov, clock, 5.0, {True: 1500, False: 1000}))


def test_load_governor_keeps_drafting_where_it_pays_and_stays_out_below_two_sessions():
    from specsplit.speculation.adaptive import LoadGovernor

    clock = _Clock()
    gov = LoadGovernor(clock=clock)
    gov.enter()
    assert all(_serve(gov, clock, 5.0, {True: 1, False: 1000}))  # one completion: adaptive k alone decides
    gov.enter()
    modes = _serve(gov, clock, 20.0, {True: 1500, False: 1000})
    late = modes[len(modes) // 2:]
    assert sum(late) / len(late) > 0.8


def test_choose_k_is_zero_while_the_governor_says_drafting_does_not_pay():
    from specsplit.sampling.params import SamplingParams
    from specsplit.speculation.round import RoundBook
    from specsplit.speculation.sequence import Sequence

    costs = _costs(draft_step=0.0005, verify={0: 0.010, 5: 0.011})
    seq = Sequence(0, [1, 2, 3], SamplingParams(max_tokens=50, temperature=0.0), (0,), 100)
    adaptive, fixed = RoundBook(seq, 5, adaptive=True), RoundBook(seq, 5, adaptive=False)
    adaptive.adaptive.alpha = Acceptance.prior(0.95)
    assert adaptive.choose_k(costs, True) == 5
    costs.governor.active, costs.governor.drafting = 8, False
    assert adaptive.choose_k(costs, True) == 0
    assert fixed.choose_k(costs, True) == 5  # a fixed k stays fixed


def test_a_steady_power_of_two_load_stays_one_load_level():
    """8 sessions average 7.x (one restarting between requests) to 8: one level, not two, so the
    governor measures and re-checks it once."""
    from specsplit.speculation.adaptive import load_bucket

    assert {load_bucket(x) for x in (6.0, 7.2, 7.9, 8.0, 8.6, 11.0)} == {3}
    assert {load_bucket(x) for x in (28.5, 31.4, 32.0, 40.0)} == {5}
    assert load_bucket(2.0) < load_bucket(4.0) < load_bucket(8.0) < load_bucket(16.0) < load_bucket(64.0)
