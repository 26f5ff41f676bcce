"""EAGLE and EAGLE-3 in `LLM(...)`: greedy output token-identical to plain decoding (TP 1 and
2, fixed and adaptive k, KV preemption), sampling keeps the target's distribution.

Random heads accept little, so one target is made to accept everything: a "bigram" model
whose layers add nothing (o_proj and down_proj zero), so its next token depends on the last
token alone; an EAGLE-1 head whose fc passes the embedding and whose layer adds nothing
then drafts exactly the target's greedy continuation.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from specsplit import SamplingParams
from specsplit.testing import make_tiny_model
from tests.speculation.eagle_layouts import write_eagle1, write_eagle3
from tests.speculation.test_engine_sampling import exact_marginals, pvalue

PROMPTS = ["def fibonacci(n):", "The quick brown", "for i in range(10):\n", "la la la la la la la"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
KV = 1 << 24


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eagle-engine")


@pytest.fixture(scope="module")
def target8(root) -> Path:
    """Eight layers, so EAGLE-3 reads vLLM's default layers (2, 4, 5)."""
    return make_tiny_model(root / "target8", layers=8, init_std=0.5)


@pytest.fixture(scope="module")
def heads(root, target8) -> dict[str, Path]:
    return {"eagle": write_eagle1(root / "e1", target8, fmt="bin"),
            "eagle3": write_eagle3(root / "e3", target8, list(range(0, 384, 2)), fmt="safetensors")}


@pytest.fixture(scope="module")
def bigram(root) -> tuple[Path, Path]:
    """(target whose layers add nothing, EAGLE-1 head that drafts its greedy path exactly)."""
    folder = make_tiny_model(root / "bigram", layers=2, init_std=0.5)
    f = folder / "model.safetensors"
    w = load_file(f)
    for k in w:
        if k.endswith(("o_proj.weight", "down_proj.weight")):
            w[k] = torch.zeros_like(w[k])
    save_file(w, str(f), metadata={"format": "pt"})
    head = write_eagle1(root / "perfect", folder)
    state = torch.load(head / "pytorch_model.bin", weights_only=True)
    h = state["fc.bias"].shape[0]
    state["fc.weight"] = torch.cat([torch.eye(h), torch.zeros(h, h)], dim=1)  # fc([emb, state]) = emb
    state["fc.bias"] = torch.zeros(h)
    for k in ("layers.0.self_attn.o_proj.weight", "layers.0.mlp.down_proj.weight"):
        state[k] = torch.zeros_like(state[k])
    torch.save(state, head / "pytorch_model.bin")
    return folder, head


def spec(method: str, head: Path, k: int = 3, adaptive: bool = False) -> dict:
    return {"method": method, "model": str(head), "num_speculative_tokens": k, "adaptive": adaptive}


def ids(outs) -> list[list[int]]:
    return [c.token_ids for o in outs for c in o.outputs]


@pytest.fixture(scope="module")
def reference(make_llm, target8):
    return ids(make_llm(target8, kv_cache_memory_bytes=KV).generate(PROMPTS, GREEDY, use_tqdm=False))


@pytest.mark.parametrize("k,adaptive", [(1, False), (4, False), (5, True)])
@pytest.mark.parametrize("method", ["eagle", "eagle3"])
def test_greedy_equals_plain(make_llm, target8, heads, reference, method, k, adaptive):
    llm = make_llm(target8, spec(method, heads[method], k, adaptive), kv_cache_memory_bytes=KV)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert ids(outs) == reference
    assert sum(o.metrics.num_drafted_tokens for o in outs) > 0  # the head did draft


def test_perfect_head_accepts_every_draft_and_equals_plain(make_llm, bigram):
    target, head = bigram
    ref = ids(make_llm(target, kv_cache_memory_bytes=KV).generate(PROMPTS, GREEDY, use_tqdm=False))
    outs = make_llm(target, spec("eagle", head, 4), kv_cache_memory_bytes=KV).generate(PROMPTS, GREEDY, use_tqdm=False)
    assert ids(outs) == ref
    drafted = sum(o.metrics.num_drafted_tokens for o in outs)
    assert drafted > 50 and sum(o.metrics.num_accepted_tokens for o in outs) == drafted


def test_kv_preemption_equals_plain(make_llm, target8, heads, reference):
    per_block = 2 * 8 * 16 * 2 * 16 * 4  # 8 layers, 16 tokens, 2 KV heads of 16, fp32
    llm = make_llm(target8, spec("eagle3", heads["eagle3"]), kv_cache_memory_bytes=4 * per_block, max_model_len=64)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert ids(outs) == reference


def test_tensor_parallel_2_greedy_equals_plain(target8, heads, reference):
    """The target sharded over two processes (gloo): rank 0 returns the hidden states, the
    head reads embeddings and LM head from the checkpoint (rank 0 holds a vocabulary slice)."""
    from specsplit import LLM

    for method in ("eagle", "eagle3"):  # one process group at a time: each LLM is shut down
        with LLM(str(target8), speculative_config=spec(method, heads[method]), kv_cache_memory_bytes=KV,
                 tensor_parallel_size=2, device="cpu") as llm:
            outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert ids(outs) == reference, method
        assert sum(o.metrics.num_drafted_tokens for o in outs) > 0


def test_draft_tier_without_the_target_model_is_refused(target8, heads):
    from specsplit.config import SpeculativeConfig
    from specsplit.factory import load_drafter

    with pytest.raises(ValueError, match="needs the target model"):
        load_drafter(SpeculativeConfig(**spec("eagle3", heads["eagle3"])), None, 384)


def test_missing_head_folder_is_refused(make_llm, target8, tmp_path):
    with pytest.raises(ValueError, match="specsplit eagle train"):
        make_llm(target8, spec("eagle", tmp_path / "nothing"), kv_cache_memory_bytes=KV)


@pytest.mark.parametrize("method", ["eagle", "eagle3"])
def test_sampling_follows_target_distribution(make_llm, bigram, root, method):
    """The second token comes out of a verified EAGLE block (the first round has no target
    state to draft from): its marginal must be the target's, by chi-square."""
    target, head = bigram
    if method == "eagle3":
        head = write_eagle3(root / "e3-bigram", target, list(range(384)), seed=3, aux_layers=[0, 1, 2])
    prompt = [5, 6, 7, 8, 9, 10]
    llm = make_llm(target, spec(method, head), max_num_seqs=512, kv_cache_memory_bytes=1 << 25)
    outs = llm.generate([{"prompt_token_ids": prompt}] * 128, SamplingParams(n=16, temperature=1.0, max_tokens=3, ignore_eos=True),
                        use_tqdm=False)
    tokens = torch.tensor([c.token_ids[:2] for o in outs for c in o.outputs]).numpy()
    assert sum(o.metrics.num_drafted_tokens for o in outs) > 0
    p1, p2 = exact_marginals(target, prompt)
    pv = (pvalue(tokens[:, 0], p1), pvalue(tokens[:, 1], p2))
    assert min(pv) > 1e-3, f"chi-square p-values {pv}"
