"""A draft block in one CUDA graph replay (`ModelRunner.forward_chain`) drafts exactly what
stepping one token at a time does, leaves the same KV cache behind, and honours a plan.
Needs CUDA: the chain exists only where graphs do."""

from __future__ import annotations

import pytest
import torch

from specsplit.runtime.random_weights import random_model
from specsplit.runtime.runner import ModelRunner
from specsplit.sampling.params import SamplingParams
from specsplit.speculation.drafters import DraftModelDrafter, DraftRequest

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SHAPE = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024)
PROMPTS = [[(7 * i + 3) % 500 + 1 for i in range(n)] for n in (5, 17, 31)]  # across block boundaries


def _drafter(chain: bool, alternatives: int = 0) -> DraftModelDrafter:
    dev = torch.device("cuda")
    cfg, model = random_model(SHAPE, dev, torch.float32, seed=3, std=0.2)
    runner = ModelRunner.from_model(cfg, model, device=dev, max_model_len=512, kv_cache_bytes=8 << 20)
    if not chain:
        runner.forward_chain = lambda *a, **k: None  # type: ignore[method-assign]
    d = DraftModelDrafter(runner)
    d.alternatives = alternatives  # > 0: each position's runner-up candidates, for the tree of guesses
    return d


def _blocks(d: DraftModelDrafter, prompts: list[list[int]], rounds: int = 3, k: int = 5,
            alts: list | None = None) -> list[list[list[int]]]:
    """Draft `rounds` blocks per session, each after committing the block's first two tokens
    (and collect each proposal's candidates into `alts`)."""
    greedy = SamplingParams(temperature=0.0)
    for i, p in enumerate(prompts):
        d.open(i, p, greedy)
    lengths = [len(p) for p in prompts]
    out: list[list[list[int]]] = [[] for _ in prompts]
    new: list[list[int]] = [[] for _ in prompts]
    for _ in range(rounds):
        props = d.propose([DraftRequest(i, lengths[i], new[i], k) for i in range(len(prompts))])
        for i, prop in enumerate(props):
            out[i].append(prop.token_ids)
            if alts is not None:
                alts.append(prop.alts)
            lengths[i] += len(new[i])
            new[i] = prop.token_ids[:2]  # two accepted, the rest rolled back
    return out


@pytest.mark.parametrize("batch", [1, 3])
def test_chained_draft_blocks_equal_one_step_at_a_time(batch: int) -> None:
    chained, stepped = _drafter(True), _drafter(False)
    got = _blocks(chained, PROMPTS[:batch])
    assert got == _blocks(stepped, PROMPTS[:batch])
    assert chained.runner.graphs.chains, "the chain was used"  # type: ignore[union-attr]
    assert not stepped.runner.graphs.chains  # type: ignore[union-attr]


@pytest.mark.parametrize("batch", [1, 3])
def test_a_chained_block_gives_the_tree_the_same_candidates_as_stepping(batch: int) -> None:
    chained, stepped = _drafter(True, alternatives=2), _drafter(False, alternatives=2)
    got_alts: list = []
    ref_alts: list = []
    assert _blocks(chained, PROMPTS[:batch], alts=got_alts) == _blocks(stepped, PROMPTS[:batch], alts=ref_alts)
    assert chained.runner.graphs.chains, "the chain was used with candidates on"  # type: ignore[union-attr]
    for a, b in zip(got_alts, ref_alts, strict=True):
        assert a.cand_ids == b.cand_ids and len(a.cand_ids[0]) == 3  # top-3: the drafted token and 2 runners-up
        torch.testing.assert_close(torch.tensor(a.cand_p), torch.tensor(b.cand_p), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.tensor(a.chosen_p), torch.tensor(b.chosen_p), rtol=1e-4, atol=1e-5)


def test_a_plan_replaces_the_models_choice_where_set() -> None:
    d = _drafter(True)
    d.open(0, PROMPTS[1], SamplingParams(temperature=0.0))
    plan = torch.tensor([[11, -1, 13, -1, 15]], device="cuda")
    d._planned = lambda reqs, sessions, kmax: plan  # type: ignore[method-assign]
    block = d.propose([DraftRequest(0, len(PROMPTS[1]), [], 5)])[0].token_ids
    assert block[0] == 11 and block[2] == 13 and block[4] == 15
    ref = _drafter(False)
    ref.open(0, PROMPTS[1], SamplingParams(temperature=0.0))
    ref._planned = lambda reqs, sessions, kmax: plan  # type: ignore[method-assign]
    assert ref.propose([DraftRequest(0, len(PROMPTS[1]), [], 5)])[0].token_ids == block


def test_steps_returning_hidden_states_run_in_graphs_and_match_eager_ones() -> None:
    """An EAGLE draft's target: a verify that also returns hidden states replays its own graph,
    with the same logits and states as the eager step."""
    from specsplit.runtime.runner import StepInput

    dev = torch.device("cuda")
    out = []
    for eager in (False, True):
        cfg, model = random_model(SHAPE, dev, torch.float32, seed=3, std=0.2)
        runner = ModelRunner.from_model(cfg, model, device=dev, max_model_len=512, kv_cache_bytes=8 << 20,
                                        enforce_eager=eager)
        for s, p in enumerate(PROMPTS):
            runner.add(s)
            runner.forward([StepInput(s, p)])
        steps = [runner.forward_hidden([StepInput(s, [5, 6, 7], 3, 3) for s in range(3)], (0, 1, 2)) for _ in range(2)]
        out.append(steps)
        if not eager:
            assert runner.graphs is not None and runner.graphs.hidden, "the hidden-state step was captured"
    for (lg, st), (le, se) in zip(out[0], out[1], strict=True):
        assert st.shape == (9, 3 * SHAPE["hidden_size"])
        torch.testing.assert_close(lg, le, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(st, se, rtol=1e-4, atol=1e-4)
