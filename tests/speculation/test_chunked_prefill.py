"""Chunked prefill: a long prompt goes in chunk by chunk, each step bounded, other sessions'
rounds go on between the chunks, and the tokens are those of an unchunked prefill."""

from __future__ import annotations

import pytest

from specsplit.runtime.runner import ModelRunner
from specsplit.sampling.params import SamplingParams
from specsplit.speculation.drafters import DraftModelDrafter, DraftRequest
from specsplit.speculation.target import (
    MIN_CHUNK,
    ROUND_TOKENS,
    TargetVerifier,
    VerifyItem,
    plan_chunks,
)

GREEDY = SamplingParams(temperature=0.0)
LONG = [(7 * i + 3) % 300 + 5 for i in range(300)]  # a 300-token prompt


def _runner(tiny_target) -> ModelRunner:
    return ModelRunner.from_folder(tiny_target, block_size=16, kv_cache_bytes=1 << 24, max_model_len=512)


@pytest.fixture(scope="module")
def reference(tiny_target) -> list[int]:
    """Eight greedy tokens after LONG, prefilled in one step (the budget covers it)."""
    v = TargetVerifier(_runner(tiny_target), prefill_chunk=4096)
    v.open(1, LONG, GREEDY)
    out = []
    for _ in range(8):
        (r,) = v.step([VerifyItem(1)])
        assert not r.pending
        out += r.emitted
    return out


def test_plan_gives_rounds_whole_and_shares_the_budget_among_prompts() -> None:
    assert plan_chunks([5, 300, 300], [1, 300, 300], 100) == [None, 95, 0]
    assert plan_chunks([300, 5], [300, 1], 100) == [100, None]
    assert plan_chunks([ROUND_TOKENS, 80], [1, 80], 10) == [None, MIN_CHUNK]  # the first cut prompt still moves
    assert plan_chunks([50], [50], 100) == [None]


def test_long_prompt_prefilled_in_bounded_chunks_gives_the_same_tokens(tiny_target, reference) -> None:
    v = TargetVerifier(_runner(tiny_target), prefill_chunk=64)
    v.open(1, LONG, GREEDY)
    progress, out = [], []
    while len(out) < 8:
        before = v.runner.length(1)
        (r,) = v.step([VerifyItem(1)])
        assert v.runner.length(1) - before <= 64 + 1
        if r.pending:
            assert not r.emitted
            progress.append(r.prefill)
        else:
            out += r.emitted
    assert out == reference
    assert progress == [(64 * i, 300) for i in range(1, 5)]


def test_other_sessions_rounds_go_on_during_a_long_prefill(tiny_target, reference) -> None:
    v = TargetVerifier(_runner(tiny_target), prefill_chunk=64)
    v.open(1, [5, 6, 7], GREEDY)
    v.step([VerifyItem(1)])
    v.open(2, LONG, GREEDY)
    rounds = 0
    long_out: list[int] = []
    while len(long_out) < 8:
        r1, r2 = v.step([VerifyItem(1), VerifyItem(2)])
        assert not r1.pending and len(r1.emitted) == 1  # a token every step
        rounds += 1
        long_out += r2.emitted
    assert rounds >= 5 and long_out == reference


def test_drafter_prefills_a_long_prompt_in_chunks_proposing_nothing_meanwhile(tiny_target) -> None:
    whole = DraftModelDrafter(_runner(tiny_target))
    whole.prefill_chunk = 4096
    whole.open(1, LONG, GREEDY)
    (ref,) = whole.propose([DraftRequest(1, len(LONG), [], 4)])
    d = DraftModelDrafter(_runner(tiny_target))
    d.prefill_chunk = 64
    d.open(1, LONG, GREEDY)
    empty = 0
    while True:
        before = d.runner.length(1)
        (p,) = d.propose([DraftRequest(1, len(LONG), [], 4)])
        if p.token_ids:
            break
        empty += 1
        assert d.runner.length(1) - before <= 64
    assert empty == 4 and p.token_ids == ref.token_ids


@pytest.mark.parametrize("method", [None, "draft_model"])
def test_engine_output_with_chunked_prefill_equals_unchunked(tiny_target, tiny_draft, method) -> None:
    from specsplit import LLM

    spec = {"method": "draft_model", "model": str(tiny_draft), "num_speculative_tokens": 3, "adaptive": False} \
        if method else None
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = []
    for chunk in (4096, 48):
        llm = LLM(str(tiny_target), speculative_config=spec, kv_cache_memory_bytes=1 << 24, max_model_len=512)
        llm.engine.target.prefill_chunk = chunk
        if llm.engine.drafter is not None:
            llm.engine.drafter.prefill_chunk = chunk
        (o,) = llm.generate({"prompt_token_ids": LONG}, params, use_tqdm=False)
        outs.append(o.outputs[0].token_ids)
    assert outs[0] == outs[1] and len(outs[0]) == 12


def _first_result(tiny_target, chunk: int, **params) -> object:
    """The first complete verify after LONG, with EAGLE states (two layers) and prompt logprobs."""
    v = TargetVerifier(_runner(tiny_target), prefill_chunk=chunk)
    v.open(1, LONG, SamplingParams(temperature=0.0, **params), hidden_layers=(1, 2))
    while True:
        (r,) = v.step([VerifyItem(1)])
        if not r.pending:
            return r


def test_chunks_hand_over_every_prompt_state_and_prompt_logprob_with_the_first_token(tiny_target) -> None:
    """What the chunks produce (EAGLE's hidden states, echo's prompt logprobs) arrives with the
    session's first token, the same as from one unchunked prefill."""
    import torch

    whole = _first_result(tiny_target, 4096, prompt_logprobs=2)
    chunked = _first_result(tiny_target, 64, prompt_logprobs=2)
    assert whole.hidden_states.shape[0] == len(LONG)  # type: ignore[attr-defined]
    torch.testing.assert_close(chunked.hidden_states, whole.hidden_states, rtol=1e-4, atol=1e-4)  # type: ignore[attr-defined]
    assert chunked.prompt_ids == whole.prompt_ids == LONG[1:]  # type: ignore[attr-defined]
    assert [sorted(d) for d in chunked.prompt_logprobs] == [sorted(d) for d in whole.prompt_logprobs]  # type: ignore[attr-defined]
    assert chunked.emitted == whole.emitted  # type: ignore[attr-defined]
