"""Uniform steps: short steps padded to one query length and a batch bucket (what CUDA graphs
replay) give the same logits and the same cache as the ragged steps they stand for."""

from __future__ import annotations

import torch

from specsplit import SamplingParams
from specsplit.runtime.runner import BATCH_BUCKETS, ModelRunner, StepInput

# (seq, new tokens, logits wanted) per step; a None step rolls sequence 0 back by 3 tokens.
# Prefills of different lengths run as they are; the rest mix verify blocks of different k,
# draft catch-ups (several tokens, one logit), decode tokens, and a batch of 3 (bucket 4).
STEPS = [
    [(0, list(range(3, 40)), 1), (1, list(range(50, 61)), 1), (2, list(range(70, 75)), 1)],
    [(0, [5, 6, 7, 8, 9, 10], 6), (1, [7], 1), (2, [8, 9, 10], 1)],
    [(1, [11, 12, 13], 3), (2, [14], 1)],
    None,
    [(0, [21, 22, 23, 24], 4), (1, [25], 1), (2, [26, 27], 2)],
    [(0, [31], 1), (1, [32], 1), (2, [33], 1)],
]


def _blocks(r: ModelRunner) -> list[torch.Tensor]:
    """Keys and values of every block each sequence owns, whole blocks (past the end too)."""
    return [torch.stack([torch.stack([k[b], v[b]]) for k, v in r.cache.layers])
            for s in sorted(r.cache.seqs) for b in r.cache.seqs[s].blocks]


def _run(folder, uniform: bool) -> tuple[list[torch.Tensor], list[list[torch.Tensor]], ModelRunner]:
    r = ModelRunner.from_folder(folder, device="cpu", kv_cache_bytes=1 << 22, max_model_len=256)
    r.add(0)  # sequence 0 takes the first block: the scratch block must not be it
    if uniform:
        r.enable_uniform_steps()
    for s in (1, 2):
        r.add(s)
    out, caches = [], []
    for step in STEPS:
        if step is None:
            r.truncate(0, r.length(0) - 3)
            continue
        out.append(r.forward([StepInput(s, ids, n) for s, ids, n in step]))
        caches.append(_blocks(r))
    return out, caches, r


def test_uniform_steps_match_ragged_steps(tiny_target):
    ref, ref_caches, r0 = _run(tiny_target, uniform=False)
    out, caches, r1 = _run(tiny_target, uniform=True)
    assert r1.scratch_slot is not None and r0.scratch_slot is None
    for a, b in zip(ref, out, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    # after every step each sequence's blocks hold the same keys/values, past its end too:
    # padding wrote nothing into them, nor (below) into any block nobody owns
    for a, b in zip(ref_caches, caches, strict=True):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)
    owned = {b for s in r1.cache.seqs.values() for b in s.blocks} | {r1.scratch_slot // r1.cache.block_size}
    for k, v in r1.cache.layers:
        for b in range(k.shape[0]):
            if b not in owned:
                assert not k[b].any() and not v[b].any(), f"block {b} was written"


def test_uniform_shapes_pad_short_steps_only(tiny_target):
    r = ModelRunner.from_folder(tiny_target, device="cpu", kv_cache_bytes=1 << 22, max_model_len=256)
    assert r._uniform_shape([StepInput(0, [1, 2, 3], 3)]) is None  # off unless enabled (CUDA graphs)
    r.enable_uniform_steps()
    assert r._uniform_shape([StepInput(0, [1, 2, 3], 3), StepInput(1, [4], 1), StepInput(2, [5], 1)]) == (4, 3)
    assert r._uniform_shape([StepInput(0, list(range(40)), 1)]) is None  # a prefill chunk runs as it is
    too_many = [StepInput(i, [1], 1) for i in range(BATCH_BUCKETS[-1] + 1)]
    assert r._uniform_shape(too_many) is None


def test_scratch_block_leaves_the_pool(tiny_target):
    r = ModelRunner.from_folder(tiny_target, device="cpu", kv_cache_bytes=1 << 22, max_model_len=256)
    blocks, free = r.cache.num_blocks, r.cache.num_free_blocks
    r.enable_uniform_steps()
    assert (r.cache.num_blocks, r.cache.num_free_blocks) == (blocks - 1, free - 1)
    assert r.cache.usage == 0.0  # the scratch block is not a sequence's


def test_speculative_greedy_with_uniform_steps_equals_plain(make_llm, tiny_target, tiny_draft):
    """The engine with padded steps on both models, as it runs on CUDA, stays lossless."""
    plain = make_llm(tiny_target)
    spec = make_llm(tiny_target, {"method": "draft_model", "model": str(tiny_draft), "num_speculative_tokens": 5},
                    max_num_seqs=3)  # 3 sequences: the batch pads to the bucket of 4
    spec.engine.target.runner.enable_uniform_steps()
    spec.engine.drafter.runner.enable_uniform_steps()
    prompts = ["def fibonacci(n):", "The quick brown", "import numpy as np", "for i in range(10):"]
    sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    ref = plain.generate(prompts, sp, use_tqdm=False)
    out = spec.generate(prompts, sp, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in ref]
    assert sum(o.metrics.num_drafted_tokens for o in out) > 0
