"""Our runtime's logits equal transformers' for the same weights.

Tolerance (float32 on CPU, both sides): max |ours - transformers| < 1e-3 on every compared
logit of the tiny Llama and Qwen2 models (logits up to ~15), and < 2e-3 on SmolLM2-135M
(30 layers, logits up to ~27; the two implementations sum in different orders). The argmax
at every compared position must be identical. Measured on the 2-core CPU box: 5e-5 (tiny
Llama), 1.5e-5 (tiny Qwen2), 4e-5 (SmolLM2), so the bounds leave a 20-50x margin for other
BLAS builds.

Covered: prefill, token-by-token decode, a chunked prefill, a ragged batch that mixes
prefill chunks, verify-sized blocks and single tokens of several sequences in one forward,
rollback by truncation followed by re-feeding different tokens, and KV block sizes 1, 3
(divides none of the lengths), 16 and 64 (larger than every sequence).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from specsplit.runtime.runner import ModelRunner, StepInput

TINY_ATOL = 1e-3
SMOLLM2_ATOL = 2e-3
BLOCK_SIZES = [1, 3, 16, 64]

_hf_cache: dict[str, torch.nn.Module] = {}


def hf_model(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    key = str(folder)
    if key not in _hf_cache:
        _hf_cache[key] = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return _hf_cache[key]


@torch.inference_mode()
def hf_logits(folder: Path, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] logits of transformers' model for one sequence."""
    return hf_model(folder)(torch.tensor([ids])).logits[0].float()


def runner_for(folder: Path, block_size: int, kv_bytes: int = 1 << 22) -> ModelRunner:
    return ModelRunner.from_folder(folder, dtype="float32", block_size=block_size, kv_cache_bytes=kv_bytes,
                                   max_model_len=256)


def assert_close(ours: torch.Tensor, ref: torch.Tensor, atol: float) -> None:
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert diff < atol, f"max abs diff {diff:.3g} >= {atol}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def random_ids(n: int, seed: int, vocab: int = 384) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tiny_target, tiny_qwen2) -> Path:
    return {"llama": tiny_target, "qwen2": tiny_qwen2}[request.param]


def test_config_read_from_transformers(tiny_target, tiny_qwen2):
    llama = runner_for(tiny_target, 16).cfg
    qwen = runner_for(tiny_qwen2, 16).cfg
    assert (llama.model_type, llama.qkv_bias, llama.num_kv_heads, llama.head_dim) == ("llama", False, 2, 16)
    assert (qwen.model_type, qwen.qkv_bias) == ("qwen2", True)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_prefill_logits_match_transformers(tiny, block_size):
    ids = random_ids(37, seed=block_size)
    runner = runner_for(tiny, block_size)
    runner.add(0)
    ours = runner.forward([StepInput(0, ids, num_logits=len(ids))])
    assert_close(ours, hf_logits(tiny, ids), TINY_ATOL)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_decode_logits_match_transformers(tiny, block_size):
    ids = random_ids(30, seed=100 + block_size)
    ref = hf_logits(tiny, ids)
    runner = runner_for(tiny, block_size)
    runner.add(0)
    rows = [runner.forward([StepInput(0, ids[:10], num_logits=1)])]
    for t in ids[10:]:
        rows.append(runner.forward([StepInput(0, [t])]))
    assert_close(torch.cat(rows), ref[9:], TINY_ATOL)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_chunked_prefill_matches_transformers(tiny, block_size):
    ids = random_ids(41, seed=200 + block_size)
    runner = runner_for(tiny, block_size)
    runner.add(0)
    chunks = [ids[:7], ids[7:20], ids[20:21], ids[21:]]
    ours = torch.cat([runner.forward([StepInput(0, c, num_logits=len(c))]) for c in chunks])
    assert_close(ours, hf_logits(tiny, ids), TINY_ATOL)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_ragged_batch_matches_transformers(tiny, block_size):
    """Four sequences of different lengths, every step a different mix of query lengths."""
    seqs = [random_ids(n, seed=300 + 7 * n + block_size) for n in (5, 23, 12, 40)]
    runner = runner_for(tiny, block_size)
    fed = [0] * len(seqs)
    got: list[list[torch.Tensor]] = [[] for _ in seqs]
    # per step, tokens fed to each sequence (0 = sits this step out)
    schedule = [(5, 9, 1, 17), (0, 6, 4, 1), (0, 1, 6, 6), (0, 7, 1, 16)]
    for i in range(len(seqs)):
        runner.add(i)
    for step in schedule:
        inputs, who = [], []
        for i, n in enumerate(step):
            if n:
                inputs.append(StepInput(i, seqs[i][fed[i] : fed[i] + n], num_logits=n))
                who.append((i, n))
        logits = runner.forward(inputs)
        offset = 0
        for i, n in who:
            got[i].append(logits[offset : offset + n])
            offset += n
            fed[i] += n
    assert fed == [len(s) for s in seqs]
    for i, ids in enumerate(seqs):
        assert_close(torch.cat(got[i]), hf_logits(tiny, ids), TINY_ATOL)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_rollback_then_refeed_matches_transformers(tiny, block_size):
    """Feed a rejected continuation, truncate back, feed another: as if the first never was."""
    prefix = random_ids(19, seed=400 + block_size)
    rejected = random_ids(8, seed=401)
    accepted = random_ids(9, seed=402)
    runner = runner_for(tiny, block_size)
    runner.add(0)
    runner.add(1)  # a neighbour whose blocks must not be disturbed by the rollback
    other = random_ids(13, seed=403)
    runner.forward([StepInput(0, prefix), StepInput(1, other[:6])])
    runner.forward([StepInput(0, rejected, num_logits=len(rejected))])
    runner.truncate(0, len(prefix) - 2)  # also drop two tokens that were right
    assert runner.length(0) == len(prefix) - 2
    refeed = prefix[-2:] + accepted
    logits = runner.forward([StepInput(0, refeed, num_logits=len(refeed)), StepInput(1, other[6:], num_logits=7)])
    ours, ours_other = logits[: len(refeed)], logits[len(refeed) :]
    ref = hf_logits(tiny, prefix + accepted)
    assert_close(ours, ref[len(prefix) - 2 :], TINY_ATOL)
    assert_close(ours_other, hf_logits(tiny, other)[6:], TINY_ATOL)


def test_block_pool_floor_is_one_full_sequence(tiny_target):
    runner = ModelRunner.from_folder(tiny_target, block_size=3, max_model_len=100, kv_cache_bytes=0)
    assert runner.cache.num_blocks == 34  # ceil(100 / 3)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        ModelRunner.from_folder(tiny_target, max_model_len=10_000, kv_cache_bytes=0)


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_logits_match_transformers():
    from specsplit.models import resolve_model

    folder = resolve_model("smollm2-135m", progress=False)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok.encode("The capital of France is Paris. The capital of Italy is")
    ids2 = tok.encode("def fibonacci(n):\n    return")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0].float()
        ref2 = hf(torch.tensor([ids2])).logits[0].float()
    del hf
    runner = ModelRunner.from_folder(folder, dtype="float32", block_size=16, kv_cache_bytes=1 << 26, max_model_len=512)
    runner.add(0)
    runner.add(1)
    n0 = len(ids) - 4
    # prefill two prompts in one ragged batch, then decode the last tokens one by one
    first = runner.forward([StepInput(0, ids[:n0], num_logits=n0), StepInput(1, ids2, num_logits=len(ids2))])
    assert_close(first[:n0], ref[:n0], SMOLLM2_ATOL)
    assert_close(first[n0:], ref2, SMOLLM2_ATOL)
    decoded = torch.cat([runner.forward([StepInput(0, [t])]) for t in ids[n0:]])
    assert_close(decoded, ref[n0:], SMOLLM2_ATOL)
    assert tok.decode(ref[-1].argmax().item()).strip() == "Rome"  # the real weights, not noise
