"""Drafters: n-gram prompt lookup and the draft model, behind one interface."""

from __future__ import annotations

import pytest
import torch

from specsplit.runtime.runner import ModelRunner
from specsplit.sampling.params import SamplingParams
from specsplit.speculation.drafters import DraftModelDrafter, DraftRequest, NgramDrafter
from specsplit.speculation.session import SessionError, UnknownSession

GREEDY = SamplingParams(temperature=0.0)
CPU = torch.device("cpu")


def ngram(min_n: int = 1, max_n: int = 4) -> NgramDrafter:
    return NgramDrafter(384, CPU, min_n, max_n)


# --- n-gram lookup ---------------------------------------------------------------------------


def test_ngram_continues_the_latest_earlier_match():
    tokens = [1, 2, 3, 9, 1, 2, 4, 8, 1, 2]
    assert ngram().lookup(tokens, 3) == [4, 8, 1]  # "1 2" last seen before "4 8"


def test_ngram_prefers_the_longest_matching_tail():
    tokens = [7, 1, 2, 5, 6, 0, 1, 2, 3, 4, 7, 1, 2]
    # tail "1 2" last occurs before "3 4", but "7 1 2" matches at the start, before "5 6"
    assert ngram().lookup(tokens, 2) == [5, 6]
    assert ngram(max_n=2).lookup(tokens, 2) == [3, 4]


def test_ngram_respects_min_n():
    tokens = [5, 1, 9, 2, 1]  # only the 1-gram "1" repeats
    assert ngram().lookup(tokens, 2) == [9, 2]
    assert ngram(min_n=2).lookup(tokens, 2) == []


def test_ngram_no_match_proposes_nothing():
    assert ngram().lookup([1, 2, 3, 4], 3) == []
    assert ngram().lookup([1], 3) == []


def test_ngram_match_near_the_end_gives_a_shorter_block():
    assert ngram().lookup([1, 2, 3, 1, 2], 5) == [3, 1, 2]


def test_ngram_sampled_proposal_is_one_hot():
    d = ngram()
    d.open(0, [4, 5, 6, 4, 5], SamplingParams(temperature=1.0))
    (p,) = d.propose([DraftRequest(0, 5, [], 2)])
    assert p.token_ids == [6, 4]
    assert p.q_ids.tolist() == [[6], [4]] and p.q_probs.tolist() == [[1.0], [1.0]]
    d.open(1, [4, 5, 6, 4, 5], GREEDY)
    (p,) = d.propose([DraftRequest(1, 5, [], 2)])
    assert p.q_ids is None


def test_ngram_session_follows_prefix_and_new_tokens():
    d = ngram()
    d.open(0, [1, 2, 3, 1], GREEDY)
    assert d.propose([DraftRequest(0, 4, [], 2)])[0].token_ids == [2, 3]
    # the target accepted one proposal (2), then emitted 7: history 1 2 3 1 2 7
    assert d.sessions[0].tokens == [1, 2, 3, 1, 2, 3]
    d.propose([DraftRequest(0, 5, [7], 2)])
    assert d.sessions[0].tokens[:6] == [1, 2, 3, 1, 2, 7]


# --- the draft model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def draft_runner(tiny_draft) -> ModelRunner:
    return ModelRunner.from_folder(tiny_draft, block_size=4, kv_cache_bytes=1 << 22, max_model_len=256)


@pytest.fixture(scope="module")
def continuation(tiny_draft):
    """The draft model's own greedy continuation, by full recomputation in transformers."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_draft, dtype=torch.float32)

    @torch.inference_mode()
    def run(ids: list[int], n: int) -> list[int]:
        out = list(ids)
        for _ in range(n):
            out.append(int(hf(torch.tensor([out])).logits[0, -1].argmax()))
        return out[len(ids) :]

    return run


@pytest.fixture(scope="module")
def drafter(draft_runner) -> DraftModelDrafter:
    return DraftModelDrafter(draft_runner, top_k=8)


def test_draft_model_proposes_its_greedy_continuation(drafter, continuation):
    prompt = [10, 20, 30, 40, 50]
    drafter.open(100, prompt, GREEDY)
    (p,) = drafter.propose([DraftRequest(100, len(prompt), [], 6)])
    assert p.token_ids == continuation(prompt, 6)
    assert p.q_ids is None
    drafter.close(100)


def test_draft_model_rolls_back_to_prefix_then_appends(drafter, continuation):
    prompt = [11, 22, 33, 44]
    drafter.open(101, prompt, GREEDY)
    (first,) = drafter.propose([DraftRequest(101, 4, [], 5)])
    # the target accepted two proposals and then emitted 7 instead of the third
    history = prompt + first.token_ids[:2] + [7]
    (second,) = drafter.propose([DraftRequest(101, 6, [7], 4)])
    assert drafter.sessions[101].tokens[: len(history)] == history
    assert second.token_ids == continuation(history, 4)
    # and the pipelined guess: keep every proposal, add nothing, draft past the block
    (third,) = drafter.propose([DraftRequest(101, len(history) + 4, [], 2)])
    assert third.token_ids == continuation(history + second.token_ids, 2)
    drafter.close(101)


def test_draft_model_batch_equals_single_requests(drafter, continuation):
    prompts = {200: [1, 2, 3], 201: [5, 6, 7, 8, 9, 10, 11], 202: [42]}
    ks = {200: 3, 201: 0, 202: 5}
    for s, p in prompts.items():
        drafter.open(s, p, GREEDY)
    batch = drafter.propose([DraftRequest(s, len(p), [], ks[s]) for s, p in prompts.items()])
    for (s, p), prop in zip(prompts.items(), batch, strict=True):
        assert prop.token_ids == continuation(p, ks[s])
        drafter.close(s)
    assert batch[1].token_ids == []


def test_draft_model_sampled_proposal_carries_its_sparse_q(drafter):
    drafter.open(300, [3, 4, 5], SamplingParams(temperature=1.0, seed=7))
    (p,) = drafter.propose([DraftRequest(300, 3, [], 4)])
    drafter.close(300)
    assert p.q_ids.shape == p.q_probs.shape == (4, 8)
    assert torch.allclose(p.q_probs.sum(-1), torch.ones(4))
    for j, t in enumerate(p.token_ids):  # each token was drawn from its own support
        assert t in p.q_ids[j].tolist()
    assert all(p.q_probs[:, i].ge(p.q_probs[:, i + 1]).all() for i in range(7))  # most likely first


def test_draft_sessions_are_validated(drafter):
    with pytest.raises(UnknownSession):
        drafter.propose([DraftRequest(999, 1, [], 1)])
    drafter.open(400, [1, 2], GREEDY)
    with pytest.raises(SessionError, match="already open"):
        drafter.open(400, [1, 2], GREEDY)
    with pytest.raises(SessionError, match="prefix_len"):
        drafter.propose([DraftRequest(400, 3, [], 1)])
    with pytest.raises(SessionError, match="outside the vocabulary"):
        drafter.propose([DraftRequest(400, 2, [384], 1)])
    with pytest.raises(SessionError, match="empty"):
        drafter.open(401, [], GREEDY)
    drafter.close(400)
    drafter.close(400)  # closing twice is harmless
    assert 400 not in drafter.runner.cache.seqs
