"""The Triton backend (fused norms, rotary, cache writes, paged attention) against SDPA.

Each check runs in its own process (tests/runtime/triton_check.py): on CPU through Triton's
interpreter, which must be switched on before Triton is imported; on CUDA natively.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


def check(*args: str, interpret: bool) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1" if interpret else "0")
    p = subprocess.run([sys.executable, "-m", "tests.runtime.triton_check", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_triton_kernels_match_sdpa_in_the_interpreter(arch: str) -> None:
    check("--device", "cpu", "--arch", arch, interpret=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_triton_kernels_match_sdpa_on_cuda(dtype: str) -> None:
    check("--device", "cuda", "--dtype", dtype, interpret=False)
