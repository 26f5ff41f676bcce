"""The projection kernel chosen per shape at start-up (GPU only: it times CUDA graphs)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from unittest import mock

import pytest
import torch

from specsplit.runtime.runner import ModelRunner, StepInput
from specsplit.testing import make_tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                                 reason="needs CUDA and Triton")]


def logits(folder: Path, linear: str) -> tuple[ModelRunner, list[torch.Tensor]]:
    with mock.patch.dict(os.environ, {"SPECSPLIT_SKINNY_LINEAR": linear}):
        r = ModelRunner.from_folder(folder, device="cuda", dtype="bfloat16", backend="triton",
                                    kv_cache_bytes=1 << 24, max_model_len=256)
    r.add(0)
    out = [r.forward([StepInput(0, list(range(3, 40)), 1)]).float().cpu()]
    for t in (5, 6, 7):  # decode steps: CUDA graphs with the chosen kernels
        out.append(r.forward([StepInput(0, [t])]).float().cpu())
    out.append(r.forward([StepInput(0, [8, 9, 10, 11], 4)]).float().cpu())  # a verify block
    return r, out


def test_each_projection_shape_gets_the_faster_kernel_and_the_same_logits(tmp_path: Path) -> None:
    folder = make_tiny_model(tmp_path / "m", hidden_size=256, heads=4, kv_heads=2, intermediate=512,
                             vocab_size=4096, tokenizer=False)
    auto, got = logits(folder, "auto")
    _, ref = logits(folder, "0")
    # qkv 512x256, o 256x256, gate_up 1024x256, down 256x512, LM head 4096x256
    assert set(auto.linear_choice) == {"512x256", "256x256", "1024x256", "256x512", "4096x256"}
    for shape, c in auto.linear_choice.items():
        assert c["kernel"] in c["us"] and c["us"][c["kernel"]] == min(c["us"].values()), shape
        assert {"cublas", "triton"} <= set(c["us"]), shape
    scale = max(t.abs().max().item() for t in ref)
    for a, b in zip(got, ref, strict=True):
        assert (a - b).abs().max().item() <= 0.02 * scale
