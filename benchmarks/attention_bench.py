"""Paged attention kernel of the Triton backend, timed alone in CUDA graphs (GPU only).

For the Llama-3.1-8B heads (32 query / 8 KV heads, and one rank's 8 / 2 at TP 4): decode
(1 token), a verify block (6 tokens) and batched steps, at several context lengths; each
configuration of the kernel (tokens per iteration, parts per context, warps) with its max
difference from the reference. `--old FILE` also times the `paged_attention` of another
version of `triton_kernels.py` (e.g. `git show REV:specsplit/runtime/triton_kernels.py`) and
uses it as the reference.

    python3 benchmarks/attention_bench.py [--old /tmp/old_triton_kernels.py] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from result_file import write_result  # noqa: E402

from specsplit.runtime import triton_kernels as tk  # noqa: E402
from specsplit.runtime.cuda_graphs import time_in_graph  # noqa: E402

CASES = [(1, 200), (1, 1000), (1, 4000), (6, 200), (64, 500), (384, 500)]  # (tokens, context)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", default=None, help="another triton_kernels.py to compare with")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    old = None
    if a.old:
        spec = importlib.util.spec_from_file_location("old_triton_kernels", a.old)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)  # type: ignore[union-attr]
    dev, bs, d = torch.device("cuda"), 16, 128
    res: dict = {"benchmark": "attention_bench", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "machine": torch.cuda.get_device_name(), "command": " ".join(sys.argv), "rows": []}
    for (hq, hkv), (t, ctx) in itertools.product(((32, 8), (8, 2)), CASES):
        kc = torch.randn(4096, bs, hkv, d, device=dev, dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        seqs = max(1, t // 6)
        width = 1 << (-(-(ctx + 8) // bs) - 1).bit_length()
        bt = torch.randint(0, 4096, (seqs, max(width, 128)), device=dev, dtype=torch.int32)
        tok_seq = torch.arange(t, device=dev, dtype=torch.int32) % seqs
        pos = ctx - 1 + torch.arange(t, device=dev, dtype=torch.int32) // seqs
        q = torch.randn(t, hq, d, device=dev, dtype=torch.bfloat16)
        args = (q, kc, vc, pos, tok_seq, bt, d**-0.5)
        ref = (old or tk).paged_attention(*args).float()
        row: dict = {"q_heads": hq, "kv_heads": hkv, "tokens": t, "context": ctx}
        if old is not None:
            row["old_us"] = time_in_graph(lambda args=args: old.paged_attention(*args), dev, calls=50)
        for bn, parts, warps in itertools.product((32, 64), (4, 8), (4, 8)):
            tk.ATTENTION_BLOCK_N, tk.ATTENTION_PARTS, tk.ATTENTION_WARPS = bn, parts, warps
            err = (tk.paged_attention(*args).float() - ref).abs().max().item()
            us = time_in_graph(lambda args=args: tk.paged_attention(*args), dev, calls=50)
            row[f"block{bn}_parts{parts}_warps{warps}"] = {"us": us,
                                                          "max_abs_diff": err}
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
    if a.out:
        write_result(res, a.out, "attention_bench")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
