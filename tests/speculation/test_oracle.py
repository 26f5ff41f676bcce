"""The benchmark-only oracle drafter: the target's continuation, each token right with probability alpha."""

from __future__ import annotations

import random

import pytest
import torch

from benchmarks.oracle import OracleDrafter, confident_random_model
from specsplit.runtime.random_weights import random_model
from specsplit.runtime.runner import ModelRunner, StepInput
from specsplit.sampling.params import SamplingParams
from specsplit.speculation.branches import BranchSpec
from specsplit.speculation.drafters import DraftRequest
from specsplit.speculation.session import SessionError

CPU = torch.device("cpu")
GREEDY = SamplingParams(temperature=0.0)
VOCAB = 512
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    cfg, model = random_model(SHAPE, CPU, torch.float32)
    return ModelRunner.from_model(cfg, model, device=CPU, kv_cache_bytes=1 << 22, max_model_len=1024)


def reference(seed: int, prompt_len: int = 12, n: int = 600) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(prompt_len)], [rng.randrange(VOCAB) for _ in range(n)]


def oracle(runner: ModelRunner, alpha: float, refs: list[tuple[list[int], list[int]]]) -> OracleDrafter:
    d = OracleDrafter(runner, alpha=alpha, seed=7)
    d.set_references(refs)
    return d


def test_perfect_oracle_proposes_the_continuation_round_after_round(runner):
    prompt, cont = reference(0, n=40)
    d = oracle(runner, 1.0, [(prompt, cont)])
    d.open(1, prompt, GREEDY)
    n = len(prompt)
    (p,) = d.propose([DraftRequest(1, n, [], 5)])
    assert p.token_ids == cont[:5]
    # the target accepted 2 of them and emitted its own third token: the next block continues from there
    (p,) = d.propose([DraftRequest(1, n + 2, [cont[2]], 4)])
    assert p.token_ids == cont[3:7]
    # the draft model really ran: its cache holds every token fed, the oracle's ones included
    assert runner.length(1) == n + 3 + 3
    d.close(1)
    assert d.stats.wrong == 0 and d.stats.off_reference == 0


def test_wrong_fraction_follows_alpha_and_is_fixed_per_position(runner):
    refs = [reference(s) for s in range(3)]
    for alpha in (0.6, 0.8):
        d = oracle(runner, alpha, refs)
        right = total = 0
        for i, (prompt, cont) in enumerate(refs):
            block = d.oracle_block(i, len(prompt), len(cont))
            right += sum(a == b for a, b in zip(block, cont, strict=True))
            total += len(cont)
            assert block == d.oracle_block(i, len(prompt), len(cont))  # same position, same token
        assert abs(right / total - alpha) < 0.05, (alpha, right / total)


def test_proposals_through_propose_match_the_oracle_block(runner):
    prompt, cont = reference(5, n=30)
    d = oracle(runner, 0.5, [(prompt, cont)])
    d.open(3, prompt, GREEDY)
    (p,) = d.propose([DraftRequest(3, len(prompt), [], 6)])
    assert p.token_ids == d.oracle_block(0, len(prompt), 6)
    assert d.stats.proposed == 6 and d.stats.wrong == sum(a != b for a, b in zip(p.token_ids, cont, strict=False))
    d.close(3)


def test_unknown_prompt_and_off_reference_prefix_fall_back_to_the_draft_model(runner):
    prompt, cont = reference(9, n=20)
    d = oracle(runner, 1.0, [(prompt, cont)])
    d.open(4, [1, 2, 3], GREEDY)
    (p,) = d.propose([DraftRequest(4, 3, [], 3)])
    assert len(p.token_ids) == 3 and d.stats.unknown == 3
    d.open(5, prompt, GREEDY)
    wrong = (cont[0] + 1) % VOCAB
    d.propose([DraftRequest(5, len(prompt), [wrong], 2)])  # a token the reference does not have
    assert d.stats.off_reference == 1 and d.stats.unknown == 5
    (p,) = d.propose([DraftRequest(5, len(prompt), [cont[0]], 2)])  # back on it: the oracle again
    assert p.token_ids == cont[1:3] and d.stats.off_reference == 1
    with pytest.raises(SessionError):
        d.open(6, prompt, SamplingParams(temperature=1.0))


def test_confident_model_greedy_is_the_permutation(runner):
    cfg, model, perm = confident_random_model(SHAPE, CPU, torch.bfloat16, seed=3)
    r = ModelRunner.from_model(cfg, model, device=CPU, kv_cache_bytes=1 << 22, max_model_len=256)
    r.add(0)
    ids = [5, 17, 300, 42]
    logits = r.forward([StepInput(0, ids, len(ids))])  # [4, V]
    assert logits.argmax(-1).tolist() == [perm[t] for t in ids]
    top2 = logits.topk(2, dim=-1).values
    assert bool(((top2[:, 0] - top2[:, 1]) > 2.0).all())  # a wide margin: rounding cannot flip it


# --- beta: the runner-up the tree of guesses branches on ------------------------------------------


def _tree(runner: ModelRunner, alpha: float, beta: float, k: int = 5):
    prompt, cont = reference(3, n=40)
    d = OracleDrafter(runner, alpha=alpha, seed=7, beta=beta)
    d.alternatives = 1
    d.set_references([(prompt, cont)])
    d.free_before = runner.cache.num_free_blocks  # other tests of this module may hold sessions
    d.open(1, prompt, GREEDY)
    n = len(prompt)
    (block,) = d.propose([DraftRequest(1, n, [], k)])
    (tree,) = d.propose([DraftRequest(1, n + k, [], k, branch=BranchSpec(k, 16))])
    return d, prompt, cont, block, tree


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_the_runner_up_is_right_with_probability_beta_where_the_top_1_is_wrong(runner, beta):
    d, prompt, cont, block, tree = _tree(runner, 0.0, beta)  # every top-1 wrong
    assert all(t != c for t, c in zip(block.token_ids, cont, strict=False))
    first = next(b for b in tree.branches if b.accepted == 0)
    assert (first.token == cont[0]) is (beta == 1.0)
    if beta == 1.0:
        # the branch after the right correction follows the reference again (all wrong at alpha 0)
        assert len(first.block.token_ids) == 5 and d.stats.off_reference >= 1
    d.close(1)
    assert runner.cache.num_free_blocks == d.free_before


def test_a_branch_after_a_right_guess_proposes_the_reference(runner):
    d, prompt, cont, block, tree = _tree(runner, 1.0, 1.0)  # every top-1 right: all accepted
    own = next(b for b in tree.branches if b.accepted == 5)
    assert block.token_ids == cont[:5] and [own.token, *own.block.token_ids] == cont[5:11]
    assert all(b.token != cont[b.accepted] for b in tree.branches if b.accepted < 5)  # top-2 wrong where top-1 right
    # the verify accepted all and emitted the bonus: adopt the session's own branch, continue
    (p,) = d.propose([DraftRequest(1, len(prompt) + 11, [], 3, adopt=own.id)])
    assert p.token_ids == cont[11:14]
    d.close(1)
    assert runner.cache.num_free_blocks == d.free_before


def test_beta_is_checked(runner):
    with pytest.raises(ValueError, match="beta"):
        OracleDrafter(runner, beta=1.5)
