"""`specsplit eagle train`: a head trained on the target's own answers is written in the
published layout and drafts through the same loader, losslessly."""

from __future__ import annotations

import json

import pytest

from specsplit import SamplingParams
from specsplit.cli import main
from specsplit.speculation.eagle.checkpoint import load_head, read_tensors
from specsplit.testing import make_tiny_model


@pytest.mark.parametrize("method", ["eagle3", "eagle"])
def test_trained_head_loads_and_drafts_losslessly(tmp_path, make_llm, method):
    target = make_tiny_model(tmp_path / "target", layers=8, init_std=0.5)
    out = tmp_path / "head"
    rc = main(["eagle", "train", str(target), "--out", str(out), "--method", method, "--data", "self",
               "--sequences", "4", "--seq-len", "24", "--epochs", "1", "--draft-vocab", "128",
               "--intermediate-size", "64", "--format", "bin" if method == "eagle" else "safetensors"])
    assert rc == 0
    names = set(read_tensors(out))
    if method == "eagle3":
        assert {"fc.weight", "midlayer.hidden_norm.weight", "norm.weight", "lm_head.weight", "d2t", "t2d"} <= names
        assert (out / "model.safetensors").exists()
    else:
        assert {"fc.weight", "fc.bias", "layers.0.self_attn.q_proj.weight"} <= names
        assert not any(n.startswith("layers.0.input_layernorm") for n in names)
        assert (out / "pytorch_model.bin").exists()
    assert load_head(out, method).head.hc.method == method
    assert json.loads((out / "training.json").read_text())["data"] == "self"
    prompts = ["def fibonacci(n):", "The quick brown"]
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    ref = make_llm(target, kv_cache_memory_bytes=1 << 24).generate(prompts, greedy, use_tqdm=False)
    spec = {"method": method, "model": str(out), "num_speculative_tokens": 3, "adaptive": False}
    outs = make_llm(target, spec, kv_cache_memory_bytes=1 << 24).generate(prompts, greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]
