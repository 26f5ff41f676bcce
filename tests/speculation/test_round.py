"""The round's bookkeeping that the engine and the served loop share: room, k, commit, seeds."""

from __future__ import annotations

import pytest

from specsplit.outputs import SpecMetrics
from specsplit.sampling.params import SamplingParams
from specsplit.speculation.adaptive import CostModel, Ema
from specsplit.speculation.round import RoundBook, adapts_k, commit_verdict, completion_params
from specsplit.speculation.sequence import Sequence

EOS = 0
PROMPT = [5, 6, 7, 8]


def _seq(max_tokens: int | None = 100, max_model_len: int = 64, **params) -> Sequence:
    return Sequence(0, list(PROMPT), SamplingParams(max_tokens=max_tokens, **params), (EOS,), max_model_len)


def _dear_drafts() -> CostModel:
    """Measured costs under which adaptive k picks 0: a draft step costs 100 verifies."""
    return CostModel(draft_step=Ema(1.0), verify={k: Ema(0.010) for k in range(6)}, seen_draft=True)


# --- room and k --------------------------------------------------------------------------------


def test_room_leaves_one_token_for_the_round_before_max_tokens():
    book = RoundBook(_seq(max_tokens=10), k_max=5, adaptive=False)
    assert book.room() == 9
    book.commit(0, 0, [11] * 7, None)
    assert book.room() == 2  # 3 tokens left: a block of 2 plus the target's own token
    assert book.choose_k(CostModel(), drafting=True) == 2


def test_room_leaves_one_token_for_the_round_before_the_context_ends():
    book = RoundBook(_seq(max_tokens=None, max_model_len=12), k_max=5, adaptive=False)
    assert book.room() == 12 - len(PROMPT) - 1
    book.commit(0, 0, [11] * 5, None)
    assert book.room() == 2


def test_room_is_zero_not_negative_with_one_token_left():
    book = RoundBook(_seq(max_tokens=1), k_max=5, adaptive=True)
    assert book.room() == 0
    assert book.choose_k(CostModel(), drafting=True) == 0


def test_no_drafter_means_k_zero_whatever_the_room():
    book = RoundBook(_seq(), k_max=5, adaptive=False)
    assert book.choose_k(CostModel(), drafting=True) == 5
    assert book.choose_k(CostModel(), drafting=False) == 0


def test_unseeded_request_adapts_k_to_the_costs():
    book = RoundBook(_seq(temperature=1.0), k_max=5, adaptive=True)
    assert book.adaptive.enabled
    assert book.choose_k(_dear_drafts(), drafting=True) == 0


def test_seeded_request_keeps_k_fixed_whatever_the_costs():
    book = RoundBook(_seq(temperature=1.0, seed=3), k_max=5, adaptive=True)
    assert not book.adaptive.enabled
    assert book.choose_k(_dear_drafts(), drafting=True) == 5


def test_a_block_drafted_ahead_is_cut_to_end_within_the_verify_only_when_k_adapts():
    """1.5 ms draft steps beside a 7.5 ms verify: at most 4 ahead (+ the bonus guess) with adaptive
    k; a fixed k, asked for or a seeded request's, keeps its length whatever the timing."""
    costs = CostModel(draft_step=Ema(1.5e-3), verify={k: Ema(7.5e-3) for k in range(6)}, seen_draft=True)
    book = RoundBook(_seq(temperature=0.0), k_max=5, adaptive=True)
    assert book.choose_ahead_k(costs, 5) == min(4, book.choose_k(costs, True))
    for fixed in (RoundBook(_seq(temperature=0.0), k_max=5, adaptive=False),
                  RoundBook(_seq(temperature=1.0, seed=3), k_max=5, adaptive=True)):
        assert fixed.choose_ahead_k(costs, 5) == 5


@pytest.mark.parametrize(("adaptive", "seed", "expected"), [(True, None, True), (True, 0, False),
                                                           (False, None, False), (False, 7, False)])
def test_adapts_k_only_when_asked_and_unseeded(adaptive, seed, expected):
    assert adapts_k(adaptive, SamplingParams(seed=seed)) is expected


# --- commit --------------------------------------------------------------------------------------


def test_commit_counts_a_partly_accepted_block():
    book = RoundBook(_seq(), k_max=5, adaptive=True)
    kept, _ = book.commit(5, 2, [21, 22, 23], None)  # d1 d2 accepted, 23 recovered
    m = book.metrics
    assert kept == [21, 22, 23] and book.seq.output_ids == [21, 22, 23]
    assert (m.num_drafted_tokens, m.num_accepted_tokens, m.num_rounds, m.num_emitted_tokens) == (5, 2, 1, 3)
    book.commit(0, 0, [24], None)  # a plain round
    assert (m.num_drafted_tokens, m.num_accepted_tokens, m.num_rounds, m.num_emitted_tokens) == (5, 2, 2, 4)


def test_commit_counts_only_accepted_tokens_that_were_kept():
    book = RoundBook(_seq(max_tokens=2), k_max=5, adaptive=True)
    kept, _ = book.commit(4, 4, [21, 22, 23, 24, 25], None)  # all accepted, but max_tokens = 2
    assert kept == [21, 22] and book.seq.finish_reason == "length"
    assert book.metrics.num_accepted_tokens == 2 and book.metrics.num_emitted_tokens == 2


def test_commit_stops_at_eos_inside_the_block():
    book = RoundBook(_seq(), k_max=5, adaptive=True)
    kept, _ = book.commit(4, 3, [21, EOS, 23, 24], None)
    assert kept == [21, EOS] and book.seq.finish_reason == "stop"
    assert book.metrics.num_accepted_tokens == 2


def test_commit_learns_acceptance_only_from_drafted_blocks():
    book = RoundBook(_seq(), k_max=5, adaptive=True)
    before = book.adaptive.alpha.value
    book.commit(0, 0, [21], None)
    assert book.adaptive.alpha.value == before  # a plain round says nothing about the drafter
    book.commit(5, 0, [22], None)
    assert book.adaptive.alpha.value < before


def test_commit_moves_what_the_drafter_holds_past_its_accepted_prefix():
    book = RoundBook(_seq(), k_max=5, adaptive=True)
    book.draft_valid = len(PROMPT)  # the drafter holds the prompt and drafts a block after it
    book.commit(4, 2, [21, 22, 23], None)
    assert book.draft_valid == len(PROMPT) + 2  # d1 d2 are its own; the recovered 23 is not
    book.commit(0, 0, [24], None)
    assert book.draft_valid == len(PROMPT) + 2  # a plain round: the drafter must catch up on 23, 24


def test_commit_keeps_logprobs_and_takes_prompt_logprobs_once():
    book = RoundBook(_seq(), k_max=5, adaptive=True)
    prompt_lps = [{6: -1.0}, {7: -2.0}, {8: -3.0}]
    book.commit(0, 0, [21], [{21: -0.5}], prompt_lps)
    assert book.seq.prompt_logprobs == [None, *prompt_lps]
    book.commit(0, 0, [22], [{22: -0.25}], [{6: -9.0}])  # later verdicts never replace them
    assert book.seq.prompt_logprobs == [None, *prompt_lps]
    assert book.seq.logprobs == [{21: -0.5}, {22: -0.25}] and book.seq.cumulative_logprob == -0.75


def test_commit_of_a_one_token_prompt_has_prompt_logprobs_none_only():
    seq = Sequence(0, [5], SamplingParams(max_tokens=4), (EOS,), 64)
    commit_verdict(seq, SpecMetrics(), 0, 0, [21], None, [])
    assert seq.prompt_logprobs == [None]


def test_book_counts_into_the_metrics_it_is_given():
    """The served loop counts into its own statistics, the engine into the sequence's."""
    own = SpecMetrics()
    served = RoundBook(_seq(), k_max=5, adaptive=True, metrics=own)
    served.commit(3, 3, [21, 22, 23, 24], None)
    assert own.num_emitted_tokens == 4 and served.seq.metrics.num_emitted_tokens == 0
    engine = RoundBook(_seq(), k_max=5, adaptive=True)
    engine.commit(3, 3, [21, 22, 23, 24], None)
    assert engine.seq.metrics.num_emitted_tokens == 4


# --- seeds per completion ---------------------------------------------------------------------------


def test_completion_seeds_are_seed_plus_index():
    params = SamplingParams(n=3, seed=10, temperature=1.0)
    assert [completion_params(params, i).seed for i in range(3)] == [10, 11, 12]
    assert completion_params(params, 0) is params  # completion 0 is the request as asked with n = 1
    assert completion_params(params, 2).temperature == 1.0 and completion_params(params, 2).n == 3


def test_unseeded_completions_stay_unseeded():
    params = SamplingParams(n=3)
    assert all(completion_params(params, i) is params for i in range(3))


# --- costs ----------------------------------------------------------------------------------------------


def test_a_prompt_chunk_is_neither_a_verify_nor_a_draft_cost():
    costs = CostModel()
    costs.observe_verify(0, 5.0, prompt_chunk=True)
    costs.observe_draft_call(5.0, 3, 1, 5, prompt_chunk=True)
    assert costs.verify == {} and not costs.seen_draft
    costs.observe_verify(0, 0.01)
    costs.observe_draft_call(0.003, 3, 1, 5)
    assert costs.verify_time(0) == 0.01 and costs.draft_step.value == pytest.approx(0.001)
