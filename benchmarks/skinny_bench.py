"""Projection kernels of a decode/verify step on GPU: cuBLAS (F.linear) against our Triton
`skinny_linear`, for the Llama-3.1-8B projections at a few rows, as effective weight bandwidth.

Each timing replays a CUDA graph of calls that rotate over 8 copies of the weight (so L2
does not hold it), as a decode step's graph replays them. Prints a table and the best Triton
configuration per shape; `--out DIR` writes the JSON.

    python3 benchmarks/skinny_bench.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from specsplit.runtime.triton_kernels import skinny_linear  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
CONFIGS = [dict(BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s)
           for n, k, w, s in itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (3, 4))]


def time_graph(fn, reps: int = 40) -> float:
    """ms per call, replaying a graph of `reps` calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(3):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(reps):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(5):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / (5 * reps)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,6,16")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = torch.device("cuda")
    rows = [int(r) for r in a.rows.split(",")]
    res: dict = {"benchmark": "skinny_bench", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "machine": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    t0 = time.perf_counter()
    for name, (n, k) in SHAPES.items():
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(8)]
        gb = n * k * 2 / 1e9
        for m in rows:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            err = (skinny_linear(x, ws[0]).float() - torch.nn.functional.linear(x, ws[0]).float()).abs().max().item()
            t_cublas = time_graph(lambda i, x=x, ws=ws: torch.nn.functional.linear(x, ws[i % 8]))
            timed = []
            for cfg in CONFIGS:
                try:
                    timed.append((time_graph(lambda i, c=cfg, x=x, ws=ws: skinny_linear(x, ws[i % 8], **c)), cfg))
                except Exception as e:  # a configuration the compiler rejects (shared memory)
                    print(f"  {name} m={m} {cfg}: {type(e).__name__}", file=sys.stderr)
            t_best, cfg = min(timed, key=lambda t: t[0])
            t_default = time_graph(lambda i, x=x, ws=ws: skinny_linear(x, ws[i % 8]))
            row = {"shape": name, "n": n, "k": k, "m": m, "cublas_ms": t_cublas, "triton_default_ms": t_default,
                   "triton_best_ms": t_best, "best_config": cfg, "cublas_GBps": gb / t_cublas * 1e3,
                   "triton_best_GBps": gb / t_best * 1e3, "triton_default_GBps": gb / t_default * 1e3,
                   "max_abs_err_vs_cublas": err, "all": {json.dumps(c): t for t, c in timed}}
            res["rows"].append(row)
            print(f"[{time.perf_counter() - t0:5.0f}s] {name:8s} m={m:2d}: cuBLAS {t_cublas * 1e3:7.1f} us "
                  f"({row['cublas_GBps']:5.0f} GB/s), triton default {t_default * 1e3:7.1f} us "
                  f"({row['triton_default_GBps']:5.0f} GB/s), best {t_best * 1e3:7.1f} us "
                  f"({row['triton_best_GBps']:5.0f} GB/s) {cfg}, err {err:.1e}", file=sys.stderr, flush=True)
        ws.clear()
        torch.cuda.empty_cache()
    # the one configuration with the least time for one decode step (32 layers + LM head), per m
    layers = {"qkv": 32, "o": 32, "gate_up": 32, "down": 32, "lm_head": 1}
    for m in rows:
        step = {}
        for cfg in CONFIGS:
            c = json.dumps(cfg)
            ts = [r["all"].get(c) for r in res["rows"] if r["m"] == m]
            if all(t is not None for t in ts):
                step[c] = sum(layers[r["shape"]] * r["all"][c] for r in res["rows"] if r["m"] == m)
        cub = sum(layers[r["shape"]] * r["cublas_ms"] for r in res["rows"] if r["m"] == m)
        best = min(step, key=step.get)
        res[f"step_m{m}"] = {"cublas_ms": cub, "best_single_config": json.loads(best), "triton_ms": step[best]}
        print(f"m={m}: projections of one 8B step: cuBLAS {cub:.2f} ms, Triton {step[best]:.2f} ms with {best}",
              file=sys.stderr)
    if a.out:
        out = Path(a.out) / f"skinny_bench_{res['date'].replace(':', '')}.json"
        out.write_text(json.dumps(res, indent=1))
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
