"""Compare the Triton backend with SDPA on one model through ragged steps; exits 1 on mismatch.

Run in its own process: on CPU Triton's interpreter must be switched on before Triton is
imported (`TRITON_INTERPRET=1 python -m tests.runtime.triton_check --device cpu`).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch

from specsplit.runtime.runner import ModelRunner, StepInput, use_skinny_linear
from specsplit.testing import make_tiny_model

# (seq, new tokens, logits wanted): prefill two prompts of different length, then a verify
# block next to a decode token, then a block that crosses into a new KV block. With 16-token
# attention blocks and at most 2 parts (set in main), contexts past 16 tokens are read in two
# parts, and past 32 in parts of two blocks or more
STEPS = [
    [(0, list(range(3, 40)), 1), (1, list(range(50, 61)), 11)],
    [(0, [5, 6, 7, 8, 9, 10], 6), (1, [7], 1)],
    [(1, list(range(100, 121)), 21)],
    [(0, [11], 1), (1, [12], 1)],
]


def run(folder: Path, device: str, dtype: torch.dtype, backend: str, uniform: bool = False,
        skinny: bool = False) -> list[torch.Tensor]:
    r = ModelRunner.from_folder(folder, device=device, dtype=dtype, backend=backend, kv_cache_bytes=1 << 22,
                                enforce_eager=True, max_model_len=256)
    assert r.backend == backend
    if uniform:  # short steps padded to uniform shapes, as CUDA graphs run them
        r.enable_uniform_steps()
    if skinny:  # our projection kernel for steps of at most 16 rows
        use_skinny_linear(r.model)
    r.add(0)
    r.add(1)
    return [r.forward([StepInput(s, ids, n) for s, ids, n in step]).float().cpu() for step in STEPS]


def check_skinny_linear(device: str, dtype: torch.dtype, tol: float) -> bool:
    """The projection kernel alone against F.linear: rows 1..16, with and without bias, K not a
    multiple of the block."""
    from specsplit.runtime.triton_kernels import skinny_linear

    g = torch.Generator().manual_seed(0)
    ok = True
    cases = [(1, 48, 256, False, 0), (6, 40, 512, True, 0), (16, 64, 512, False, 0), (3, 33, 300, True, 0),
             (2, 48, 1024, True, 4), (5, 33, 700, False, 3)]  # the last two split K (4 and 3 ways)
    for m, n, k, bias, split in cases:
        x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) / k**0.5
        b = torch.randn(n, generator=g) if bias else None
        x, w = x.to(device, dtype), w.to(device, dtype)
        b = b.to(device, dtype) if b is not None else None
        y = skinny_linear(x, w, b, BLOCK_K=128, SPLIT_K=split).float()
        ref = torch.nn.functional.linear(x.float(), w.float(), b.float() if b is not None else None)
        err = (y - ref).abs().max().item()
        again = skinny_linear(x, w, b, BLOCK_K=128, SPLIT_K=split).float()  # counters re-armed, same sums
        print(f"skinny_linear m={m} n={n} k={k} bias={bias} split={split}: max |diff| {err:.2e}")
        ok = ok and torch.equal(y, again)
        ok = ok and err <= tol
    return ok


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--arch", default="llama")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    if importlib.util.find_spec("triton") is not None:
        from specsplit.runtime import triton_kernels

        # short contexts then span several parts, and parts several blocks (the interpreter is slow)
        triton_kernels.ATTENTION_BLOCK_N, triton_kernels.ATTENTION_PARTS = 16, 2
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tiny_model(Path(tmp) / "m", args.arch, heads=4, kv_heads=2, hidden_size=64,
                                 tokenizer=False)
        ref = run(folder, args.device, dtype, "sdpa")
        outs = {"triton": run(folder, args.device, dtype, "triton"),
                "triton, uniform steps": run(folder, args.device, dtype, "triton", uniform=True),
                "triton, uniform steps, skinny linear": run(folder, args.device, dtype, "triton", uniform=True,
                                                            skinny=True)}
    scale = max(a.abs().max().item() for a in ref)
    tol = 2e-4 if dtype == torch.float32 else 0.02 * scale  # bf16 rounds differently in fused kernels
    ok = True
    for name, out in outs.items():
        worst = max((a - b).abs().max().item() for a, b in zip(ref, out, strict=True))
        same_argmax = all(torch.equal(a.argmax(-1), b.argmax(-1)) for a, b in zip(ref, out, strict=True))
        print(f"max |{name} - sdpa| = {worst:.2e} (tolerance {tol}); argmax equal: {same_argmax}")
        ok = ok and worst <= tol and (same_argmax or dtype != torch.float32)
    ok = check_skinny_linear(args.device, dtype, 1e-4 if dtype == torch.float32 else 0.05) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
