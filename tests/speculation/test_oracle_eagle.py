"""The benchmark-only EAGLE-3 oracle: the head runs for real, its tokens are the reference's with
probability alpha, and it drafts only from target states, as the served head does."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # oracle_eagle imports `oracle`
from benchmarks.oracle_eagle import head_config, random_eagle3_drafter  # noqa: E402
from specsplit.sampling.params import SamplingParams  # noqa: E402
from specsplit.speculation.drafters import DraftRequest  # noqa: E402

SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024)
GREEDY = SamplingParams(temperature=0.0)


def _drafter(alpha: float, prompt: list[int], cont: list[int]):
    d = random_eagle3_drafter(SHAPE, torch.device("cpu"), torch.float32, max_model_len=1024, kv_cache_bytes=1 << 22)
    d.set_alpha(alpha)
    d.set_references([(prompt, cont)])
    d.open(1, prompt, GREEDY)
    return d


def test_head_config_reads_vllms_default_layers():
    cfg = head_config(SHAPE)
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5] and cfg["num_hidden_layers"] == 1
    assert cfg["draft_vocab_size"] == 512


def test_perfect_oracle_proposes_the_continuation_and_the_head_runs():
    rng = random.Random(0)
    prompt, cont = [rng.randrange(512) for _ in range(10)], [rng.randrange(512) for _ in range(40)]
    d = _drafter(1.0, prompt, cont)
    n = len(prompt)
    (p,) = d.propose([DraftRequest(1, n, [], 4)])
    assert p.token_ids == []  # no target states yet: nothing to draft from
    (p,) = d.propose([DraftRequest(1, n, [], 4, torch.randn(n - 1, 3 * 64))])
    assert p.token_ids == cont[:4]
    assert d.runner.cache.seqs[1].length == (n - 1) + 3  # the head's cache: the states' entries + 3 of its own
    (p,) = d.propose([DraftRequest(1, n + 2, [cont[2]], 3, torch.randn(3, 3 * 64))])
    assert p.token_ids == cont[3:6]
    assert d.stats.wrong == 0


def test_zero_alpha_never_proposes_the_reference():
    rng = random.Random(1)
    prompt, cont = [rng.randrange(512) for _ in range(10)], [rng.randrange(512) for _ in range(40)]
    d = _drafter(0.0, prompt, cont)
    (p,) = d.propose([DraftRequest(1, 10, [], 5, torch.randn(9, 3 * 64))])
    assert len(p.token_ids) == 5 and all(t != c for t, c in zip(p.token_ids, cont, strict=False))
    assert d.stats.wrong == 5
