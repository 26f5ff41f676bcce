"""The tree of guesses: one batched pass drafts a block for each likely outcome of a verify."""

from __future__ import annotations

import pytest
import torch

from specsplit.runtime.runner import ModelRunner
from specsplit.sampling.params import SamplingParams
from specsplit.speculation.branches import Alternatives, BranchSpec, outcomes
from specsplit.speculation.drafters import DraftModelDrafter, DraftRequest
from specsplit.speculation.session import SessionError

GREEDY = SamplingParams(temperature=0.0)
PROMPT = [10, 20, 30, 40, 50, 60, 70]
K = 4


def test_outcomes_rank_by_the_drafts_probabilities():
    alts = Alternatives(5, [1, 2, 3], [0.9, 0.5, 0.8], [[1, 7], [8, 2], [3, 9]], [[0.9, 0.05], [0.3, 0.5], [0.8, 0.1]])
    tokens = [0, 0, 0, 0, 0, 1, 2, 3]
    # all accepted 0.36; reject d2 for 8: 0.9 * 0.3; reject d1 for 7: 0.05; reject d3 for 9: 0.045
    assert [(j, c) for _, j, c in outcomes(tokens, alts, 3, 10)] == [(3, -1), (1, 8), (0, 7), (2, 9)]
    assert [(j, c) for _, j, c in outcomes(tokens, alts, 3, 2)] == [(3, -1), (1, 8)]
    # the block's second token is not what the draft drafted there: no guesses past it
    assert [(j, c) for _, j, c in outcomes([0, 0, 0, 0, 0, 1, 5, 3], alts, 3, 10)] == [(3, -1), (0, 7)]
    assert outcomes(tokens, None, 3, 10) == [(1.0, 3, -1)]


@pytest.fixture(scope="module")
def runner(tiny_draft) -> ModelRunner:
    return ModelRunner.from_folder(tiny_draft, block_size=4, kv_cache_bytes=1 << 22, max_model_len=256)


@pytest.fixture()
def drafter(runner) -> DraftModelDrafter:
    d = DraftModelDrafter(runner, top_k=8)
    d.alternatives = 1
    yield d
    for s in list(d.sessions):
        d.close(s)
    assert runner.cache.num_free_blocks == runner.cache.num_blocks  # nothing leaked, branches included


@pytest.fixture(scope="module")
def continuation(tiny_draft):
    """The draft model's own greedy continuation, by full recomputation in transformers."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_draft, dtype=torch.float32)

    @torch.inference_mode()
    def run(ids: list[int], n: int) -> tuple[list[int], list[int]]:
        """(greedy continuation, the runner-up at each of its positions)."""
        out, second = list(ids), []
        for _ in range(n):
            top = hf(torch.tensor([out])).logits[0, -1].topk(2).indices.tolist()
            out.append(top[0])
            second.append(top[1])
        return out[len(ids) :], second

    return run


def _block_then_branches(d: DraftModelDrafter, seq_id: int, params=GREEDY, max_branches: int = 16):
    d.open(seq_id, PROMPT, params)
    (block,) = d.propose([DraftRequest(seq_id, len(PROMPT), [], K)])
    (tree,) = d.propose([DraftRequest(seq_id, len(PROMPT) + K, [], K, branch=BranchSpec(K, max_branches))])
    return block, tree


def test_every_branch_is_the_drafts_continuation_of_its_outcome(drafter, continuation):
    block, tree = _block_then_branches(drafter, 1)
    assert block.token_ids == continuation(PROMPT, K)[0]
    assert tree.token_ids == [] and len(tree.branches) == K + 1  # every outcome, top-2 each
    second = continuation(PROMPT, K)[1]
    for b in tree.branches:
        if b.accepted == K:
            assert [b.token, *b.block.token_ids] == continuation(PROMPT + block.token_ids, K + 1)[0]
        else:
            assert b.token == second[b.accepted]  # the runner-up where d_{j+1} was rejected
            prefix = PROMPT + block.token_ids[: b.accepted] + [b.token]
            assert b.block.token_ids == continuation(prefix, K)[0]


def test_adopting_a_branch_continues_from_its_tokens(drafter, continuation):
    block, tree = _block_then_branches(drafter, 2)
    b = next(b for b in tree.branches if b.accepted == 1)
    history = PROMPT + block.token_ids[:1] + [b.token]
    # the verify accepted 1 and emitted the guess: adopt, keep the branch's block, guess again
    (nxt,) = drafter.propose([DraftRequest(2, len(history) + K, [], K, branch=BranchSpec(K, 16), adopt=b.id)])
    assert drafter.sessions[2].tokens[: len(history) + K] == history + b.block.token_ids
    own = next(x for x in nxt.branches if x.accepted == K)
    assert [own.token, *own.block.token_ids] == continuation(history + b.block.token_ids, K + 1)[0]
    assert drafter.tree.live(2) == K + 1
    assert len(drafter.tree.children) == K  # the other branches of the first tree were freed


def test_a_miss_drops_every_branch_and_rolls_back(drafter, continuation):
    block, _ = _block_then_branches(drafter, 3)
    free_with_branches = drafter.runner.cache.num_free_blocks
    history = PROMPT + block.token_ids[:2] + [5]  # an outcome nobody guessed
    (p,) = drafter.propose([DraftRequest(3, len(PROMPT) + 2, [5], K)])
    assert p.token_ids == continuation(history, K)[0]
    assert drafter.tree.live(3) == 0 and not drafter.tree.children
    assert drafter.runner.cache.num_free_blocks > free_with_branches


def test_an_unknown_branch_is_refused(drafter):
    _, tree = _block_then_branches(drafter, 4)
    bad = max(b.id for b in tree.branches) + 100
    with pytest.raises(SessionError, match="no branch"):
        drafter.propose([DraftRequest(4, len(PROMPT), [], K, adopt=bad)])
    with pytest.raises(SessionError, match="block_len"):
        drafter.propose([DraftRequest(4, len(PROMPT), [], K, branch=BranchSpec(len(PROMPT), 4))])
    with pytest.raises(SessionError, match="max_branches"):
        drafter.propose([DraftRequest(4, len(PROMPT), [], K, branch=BranchSpec(2, 0))])


def test_max_branches_keeps_the_most_likely(drafter):
    _, tree = _block_then_branches(drafter, 5, max_branches=2)
    assert len(tree.branches) == 2


def test_a_pass_never_grows_past_max_rows_and_keeps_the_likeliest_forks(drafter, continuation):
    """Two sessions guessing ahead in one pass with room for one fork beside them: the tree
    narrows to the single most likely outcome below full acceptance, across both sessions."""
    full = []
    for seq_id in (1, 2):
        drafter.open(seq_id, PROMPT, GREEDY)
        (block,) = drafter.propose([DraftRequest(seq_id, len(PROMPT), [], K)])
        full.append(block)
    probs = {seq_id: drafter.sessions[seq_id].alts for seq_id in (1, 2)}
    drafter.max_rows = 3  # the two sessions' own rows + one fork
    try:
        trees = drafter.propose([DraftRequest(s, len(PROMPT) + K, [], K, branch=BranchSpec(K, 16)) for s in (1, 2)])
    finally:
        drafter.max_rows = None
    forks = [(s, b) for s, t in zip((1, 2), trees, strict=True) for b in t.branches if b.accepted < K]
    assert len(forks) == 1 and all(any(b.accepted == K for b in t.branches) for t in trees)
    s, b = forks[0]
    # the chosen fork is the outcome the draft found likeliest among both sessions' candidates
    best = max((outcome for seq_id in (1, 2) for outcome in outcomes(
        PROMPT + full[seq_id - 1].token_ids, probs[seq_id], K, 16) if outcome[1] < K), key=lambda o: o[0])
    assert (b.accepted, b.token) == best[1:]
    history = PROMPT + full[s - 1].token_ids[: b.accepted] + [b.token]
    assert b.block.token_ids == continuation(history, K)[0]


def test_kv_pressure_gives_fewer_branches_never_an_error(tiny_draft, continuation):
    # 8 blocks of 4: the session needs 4 (PROMPT + block + guess), leaving room for few forks
    r = ModelRunner.from_folder(tiny_draft, block_size=4, kv_cache_bytes=1 << 22, max_model_len=256)
    r.cache._free = r.cache._free[-8:]
    r.cache.num_blocks = 8
    d = DraftModelDrafter(r, top_k=8)
    d.alternatives = 1
    block, tree = _block_then_branches(d, 1)
    assert 1 <= len(tree.branches) < K + 1
    own = next(b for b in tree.branches if b.accepted == K)
    assert [own.token, *own.block.token_ids] == continuation(PROMPT + block.token_ids, K + 1)[0]
    # another session needing the memory takes it from the branches, not from a session
    other = [*PROMPT, 1, 2, 3]  # 10 tokens + 3 drafted: the other 4 blocks
    d.open(2, other, GREEDY)
    (p,) = d.propose([DraftRequest(2, len(other), [], K)])
    assert p.token_ids == continuation(other, K)[0]
    assert d.tree.stats["kv_dropped"] >= 1
    # a branch whose KV was given up can still win: its tokens are re-fed
    b = next(b for b in tree.branches if b.accepted < K)
    history = PROMPT + block.token_ids[: b.accepted] + [b.token] + b.block.token_ids
    (q,) = d.propose([DraftRequest(1, len(history), [], K, adopt=b.id)])
    assert q.token_ids == continuation(history, K)[0]
    d.close(1)
    d.close(2)
    assert r.cache.num_free_blocks == 8


def test_sampled_branch_rows_are_the_drafts_distributions_at_its_prefix(drafter):
    params = SamplingParams(temperature=0.8, seed=3)
    block, tree = _block_then_branches(drafter, 6, params)
    check = DraftModelDrafter(drafter.runner, top_k=8)
    for b in tree.branches:
        if b.accepted == K:
            prefix = PROMPT + block.token_ids + [b.token]
        else:
            prefix = PROMPT + block.token_ids[: b.accepted] + [b.token]
        assert b.block.q_ids.shape == (K, 8)
        for i in range(K):  # row i: the draft's top-8 distribution after prefix + block[:i]
            check.open(99, prefix + b.block.token_ids[:i], params)
            (p,) = check.propose([DraftRequest(99, len(prefix) + i, [], 1)])
            check.close(99)
            assert p.q_ids[0].tolist() == b.block.q_ids[i].tolist()
            torch.testing.assert_close(p.q_probs[0], b.block.q_probs[i])
            assert b.block.token_ids[i] in b.block.q_ids[i].tolist()


def test_a_retried_request_finds_its_branch_adopted(drafter, continuation, monkeypatch):
    """A step that ran out of KV memory is retried with the same requests (serving.kv.preempting)."""
    from specsplit.runtime.kv_cache import OutOfKVMemory

    block, tree = _block_then_branches(drafter, 7)
    b = next(b for b in tree.branches if b.accepted == 1)
    history = PROMPT + block.token_ids[:1] + [b.token] + b.block.token_ids
    req = DraftRequest(7, len(history), [], K, branch=BranchSpec(K, 16), adopt=b.id)
    real = DraftModelDrafter._draft
    calls = []

    def failing_once(self, reqs):
        calls.append(len(reqs))
        if len(calls) == 1:
            raise OutOfKVMemory("the batch did not fit")
        return real(self, reqs)

    monkeypatch.setattr(DraftModelDrafter, "_draft", failing_once)
    with pytest.raises(OutOfKVMemory):
        drafter.propose([req])
    (again,) = drafter.propose([req])
    assert len(again.branches) == K + 1
    own = next(x for x in again.branches if x.accepted == K)
    assert [own.token, *own.block.token_ids] == continuation(history, K + 1)[0]
    assert len(drafter.tree.children) == K  # the failed attempt's forks were freed


def test_top_3_guesses_two_runner_ups_per_position(drafter, continuation):
    drafter.alternatives = 2
    block, tree = _block_then_branches(drafter, 8)
    assert len(tree.branches) == 2 * K + 1
    for j in range(K):
        guesses = {b.token for b in tree.branches if b.accepted == j}
        assert len(guesses) == 2 and block.token_ids[j] not in guesses
        assert continuation(PROMPT + block.token_ids[:j], 1)[1][0] in guesses  # the runner-up among them
