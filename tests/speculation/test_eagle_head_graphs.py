"""An EAGLE head's greedy block in one CUDA graph replay (`HeadChain`) drafts exactly what its
eager steps draft, over rounds with rollbacks, and keeps the same cache. Needs CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from specsplit.sampling.params import SamplingParams
from specsplit.speculation.drafters import DraftRequest
from specsplit.speculation.eagle.checkpoint import load_head
from specsplit.speculation.eagle.drafter import EagleDrafter, HeadRunner
from specsplit.testing import make_tiny_model
from tests.speculation.eagle_layouts import write_eagle1, write_eagle3

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DRAFT_IDS = list(range(0, 384, 3))


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("eagle-graphs") / "target", layers=8, init_std=0.5)


def _drafter(folder: Path, chain: bool) -> EagleDrafter:
    dev = torch.device("cuda")
    head = load_head(folder, device=dev).head
    gen = torch.Generator().manual_seed(0)
    embed = torch.randn(384, head.hc.model.hidden_size, generator=gen).to(dev)
    lm = torch.nn.Linear(head.hc.model.hidden_size, 384, bias=False).requires_grad_(False)
    lm.weight.copy_(torch.randn(384, head.hc.model.hidden_size, generator=gen) * 0.1)  # the same in both drafters
    lm = lm.to(dev)
    runner = HeadRunner(head, embed, lm, 384, device=dev, max_model_len=256, kv_cache_bytes=4 << 20,
                        enforce_eager=not chain)
    return EagleDrafter(runner)


def _rounds(d: EagleDrafter, batch: int, rounds: int = 4, k: int = 5) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    width = d.runner.head.hc.state_size
    prompts = [torch.randint(0, 384, (n,), generator=gen).tolist() for n in (9, 20, 37)][:batch]
    for i, p in enumerate(prompts):
        d.open(i, p, SamplingParams(temperature=0.0))
    out, lengths, new = [], [len(p) for p in prompts], [[] for _ in prompts]
    for r in range(rounds):
        reqs = []
        for i in range(batch):
            n = lengths[i] - 1 if r == 0 else len(new[i])  # the states of the tokens committed since
            states = torch.randn(n, width, generator=gen).to("cuda")
            reqs.append(DraftRequest(i, lengths[i] if r == 0 else lengths[i] - len(new[i]), new[i] if r else [],
                                     k, hidden_states=states))
        props = d.propose(reqs)
        for i, p in enumerate(props):
            out.append(p.token_ids)
            new[i] = p.token_ids[:2]
            lengths[i] += 2
    return out


@pytest.mark.parametrize("method", ["eagle", "eagle3"])
@pytest.mark.parametrize("batch", [1, 3])
def test_chained_head_steps_equal_eager_ones(tmp_path, target, method, batch):
    folder = write_eagle3(tmp_path / "h", target, DRAFT_IDS) if method == "eagle3" else write_eagle1(tmp_path / "h", target)
    chained, eager = _drafter(folder, True), _drafter(folder, False)
    assert _rounds(chained, batch) == _rounds(eager, batch)
    assert chained.runner.chain is not None and chained.runner.chain.replays > 0
    assert eager.runner.chain is None


@pytest.mark.parametrize("method", ["eagle", "eagle3"])
def test_a_block_drafted_ahead_in_a_graph_goes_on_as_one_longer_block(tmp_path, target, method):
    """The graph hands back the head's last output state: drafting ahead from it (bonus guess +
    k) in a second replay drafts what one replay of a block that much longer drafts."""
    from specsplit.speculation.branches import BranchSpec

    folder = write_eagle3(tmp_path / "h", target, DRAFT_IDS) if method == "eagle3" else write_eagle1(tmp_path / "h", target)
    a, b = _drafter(folder, True), _drafter(folder, True)
    prompt = torch.randint(0, 384, (30,), generator=torch.Generator().manual_seed(4)).tolist()
    states = torch.randn(29, a.runner.head.hc.state_size, generator=torch.Generator().manual_seed(5)).to("cuda")
    for d in (a, b):
        d.open(1, prompt, SamplingParams(temperature=0.0))
    (first,) = a.propose([DraftRequest(1, 30, [], 3, hidden_states=states)])
    (ahead,) = a.propose([DraftRequest(1, 33, [], 3, branch=BranchSpec(3, 1))])
    (long,) = b.propose([DraftRequest(1, 30, [], 7, hidden_states=states)])
    (guess,) = ahead.branches
    assert first.token_ids + [guess.token] + guess.block.token_ids == long.token_ids
    assert a.runner.chain.replays == 2 and b.runner.chain.replays == 1  # all in graphs
