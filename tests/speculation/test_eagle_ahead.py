"""An EAGLE head drafting ahead: while the target verifies a block, the head guesses the outcome
where all of it is accepted and goes on from its own output state (eagle/drafter.py). The
states of the round verified before arrive with that request and rewrite their entries in place.

The head here is the benchmark oracle's real-size-layout EAGLE-3 head on a tiny shape, with
random weights; without references it proposes its own argmax, with them (alpha = 1) the
reference's tokens, while every head step still runs.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # oracle_eagle imports `oracle`
from benchmarks.oracle_eagle import random_eagle3_drafter  # noqa: E402
from specsplit.sampling.params import SamplingParams  # noqa: E402
from specsplit.speculation.branches import BranchSpec  # noqa: E402
from specsplit.speculation.drafters import DraftRequest  # noqa: E402

SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024)
WIDTH = 3 * 64  # EAGLE-3 reads three target layers
GREEDY = SamplingParams(temperature=0.0)


def _drafter(prompt: list[int], refs: list[tuple[list[int], list[int]]] = ()):  # type: ignore[assignment]
    d = random_eagle3_drafter(SHAPE, torch.device("cpu"), torch.float32, max_model_len=1024, kv_cache_bytes=1 << 22)
    d.set_references(refs)
    d.open(1, prompt, GREEDY)
    return d


def _ahead(block_len: int) -> BranchSpec:
    return BranchSpec(block_len, 1)


def _entries(d, seq_id: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The head cache's keys and values of a session, position by position [length, Hkv, D]."""
    cache = d.runner.cache
    n = cache.seqs[seq_id].length
    blocks = torch.tensor(cache.seqs[seq_id].blocks)
    k, v = cache.layers[0]
    return k[blocks].flatten(0, 1)[:n], v[blocks].flatten(0, 1)[:n]


def test_drafting_ahead_goes_on_exactly_as_one_longer_block():
    """Block of 3, then a guess ahead (bonus + 2) from the head's own state == one block of 6."""
    rng = random.Random(0)
    prompt = [rng.randrange(512) for _ in range(10)]
    states = torch.randn(9, WIDTH, generator=torch.Generator().manual_seed(1))
    a = _drafter(prompt)
    (first,) = a.propose([DraftRequest(1, 10, [], 3, states)])
    (ahead,) = a.propose([DraftRequest(1, 13, [], 2, None, branch=_ahead(3))])
    assert len(ahead.branches) == 1
    guess = ahead.branches[0]
    assert guess.accepted == 3  # the all-accepted outcome, with the head's guess of the bonus token
    b = _drafter(prompt)
    (long,) = b.propose([DraftRequest(1, 10, [], 6, states)])
    assert first.token_ids + [guess.token] + guess.block.token_ids == long.token_ids
    for x, y in zip(_entries(a), _entries(b), strict=True):  # the same entries, each from the same state
        torch.testing.assert_close(x, y)


def test_without_a_block_of_its_own_the_head_guesses_nothing_ahead():
    """A session that never drafted (or whose tokens changed since) has no state to go on from."""
    prompt = list(range(20, 30))
    d = _drafter(prompt)
    (p,) = d.propose([DraftRequest(1, 10, [], 3, None, branch=_ahead(0))])
    assert p.branches == []
    (p,) = d.propose([DraftRequest(1, 10, [], 3, torch.randn(9, WIDTH))])
    (p,) = d.propose([DraftRequest(1, 12, [], 3, None, branch=_ahead(2))])  # the block was cut: not the tail
    assert p.branches == []


def test_states_that_arrive_ahead_rebuild_the_head_as_sequential_rounds_would():
    """A session that drafted ahead (a hit, then states in place, then a miss) ends with the same
    head cache as one that only ever drafted after each verdict: its next block is the same."""
    rng = random.Random(2)
    n = 10
    prompt, cont = [rng.randrange(512) for _ in range(n)], [rng.randrange(512) for _ in range(30)]
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(n + 7, WIDTH, generator=gen)  # the target's states at positions 0 .. n + 6
    z = (cont[7] + 1) % 512  # the target's token after the third block: off the reference
    ref = [(prompt, cont)]

    a = _drafter(prompt, ref)  # pipelined
    (p1,) = a.propose([DraftRequest(1, n, [], 3, s[: n - 1])])
    assert p1.token_ids == cont[:3]
    (p2,) = a.propose([DraftRequest(1, n + 3, [], 3, None, branch=_ahead(3))])  # beside verify 1
    (g,) = p2.branches
    assert (g.token, g.block.token_ids) == (cont[3], cont[4:7])  # verify 1: all 3 + cont[3]: a hit
    # beside verify 2 (of cont[4:7]): guess ahead again, with verify 1's states (positions n-1 .. n+2)
    (p3,) = a.propose([DraftRequest(1, n + 7, [], 2, s[n - 1 : n + 3], branch=_ahead(3), adopt=g.id)])
    assert p3.branches and p3.branches[0].token == cont[7]
    # verify 2 accepted all three but chose z: a miss; a sequential propose with its states
    (last_a,) = a.propose([DraftRequest(1, n + 7, [z], 3, s[n + 3 : n + 7])])

    b = _drafter(prompt, ref)  # sequential only
    b.propose([DraftRequest(1, n, [], 3, s[: n - 1])])
    b.propose([DraftRequest(1, n + 3, [cont[3]], 3, s[n - 1 : n + 3])])
    (last_b,) = b.propose([DraftRequest(1, n + 7, [z], 3, s[n + 3 : n + 7])])
    assert last_a.token_ids == last_b.token_ids
    assert a.state[1].valid == b.state[1].valid == n + 7  # every entry from the target's states
    for x, y in zip(_entries(a), _entries(b), strict=True):
        torch.testing.assert_close(x, y)
