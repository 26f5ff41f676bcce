"""Projection kernels of a decode/verify step on GPU: cuBLAS (F.linear) against our Triton
`skinny_linear`, as effective weight bandwidth, for the projections of the Llama-3.1-8B shape
(whole, and one rank's shard at TP 2 and TP 4) and of the Llama-3.2-1B draft, at a few rows.
Triton runs with K split across programs where a matrix has too few output strips to fill
the SMs (`SPLIT_K` auto) and without (split 1), over a few tile configurations.

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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from result_file import write_result  # noqa: E402

from specsplit.runtime.cuda_graphs import time_in_graph  # noqa: E402
from specsplit.runtime.triton_kernels import skinny_linear  # noqa: E402


def _model(hidden: int, inter: int, q: int, kv: int, tp: int) -> dict[str, tuple[int, int]]:
    """(N, K) of each projection of one rank's shard; the LM head is split by vocabulary."""
    return {"qkv": ((q + 2 * kv) // tp, hidden), "o": (hidden, q // tp), "gate_up": (2 * inter // tp, hidden),
            "down": (hidden, inter // tp), "lm_head": (128256 // tp, hidden)}


MODELS = {"8b": (_model(4096, 14336, 4096, 1024, 1), 32), "8b-tp2": (_model(4096, 14336, 4096, 1024, 2), 32),
          "8b-tp4": (_model(4096, 14336, 4096, 1024, 4), 32), "1b": (_model(2048, 8192, 2048, 512, 1), 16)}
CONFIGS = [dict(BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s)
           for n, k, w, s in itertools.product((16, 32), (128, 256, 512), (4,), (3, 4))]


def time_graph(fn, reps: int = 40) -> float:
    """ms per call of fn(i), i = 0, 1, ... in turn (each call may pick another weight copy)."""
    calls = itertools.count()
    return time_in_graph(lambda: fn(next(calls)), torch.device("cuda"), calls=reps) / 1000


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,6,16")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = torch.device("cuda")
    rows = [int(r) for r in a.rows.split(",")]
    res: dict = {"benchmark": "skinny_bench", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "machine": torch.cuda.get_device_name(), "torch": torch.__version__, "command": " ".join(sys.argv),
                 "rows": [], "steps": {}}
    t0 = time.perf_counter()
    variants = [{"SPLIT_K": 1}, {}]  # K never split; split where too few strips
    for model in a.models.split(","):
        shapes, layers = MODELS[model]
        for name, (n, k) in shapes.items():
            ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(8)]
            gb = n * k * 2 / 1e9
            for m in rows:
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                ref = torch.nn.functional.linear(x, ws[0]).float()
                err = max((skinny_linear(x, ws[0], **v).float() - ref).abs().max().item() for v in variants)
                t_cublas = time_graph(lambda i, x=x, ws=ws: torch.nn.functional.linear(x, ws[i % 8]))
                timed = {}
                for v, cfg in itertools.product(variants, CONFIGS):
                    c = {**cfg, **v}
                    try:
                        timed[json.dumps(c)] = time_graph(lambda i, c=c, x=x, ws=ws: skinny_linear(x, ws[i % 8], **c))
                    except Exception as e:  # a configuration the compiler rejects (shared memory)
                        print(f"  {name} m={m} {c}: {type(e).__name__}", file=sys.stderr)
                best = min(timed, key=timed.get)
                row = {"model": model, "shape": name, "n": n, "k": k, "m": m, "layers": 1 if name == "lm_head" else layers,
                       "cublas_ms": t_cublas, "triton_best_ms": timed[best], "best_config": json.loads(best),
                       "cublas_GBps": gb / t_cublas * 1e3, "triton_best_GBps": gb / timed[best] * 1e3,
                       "max_abs_err_vs_cublas": err, "all": timed}
                res["rows"].append(row)
                print(f"[{time.perf_counter() - t0:5.0f}s] {model:6s} {name:8s} {n:6d}x{k:5d} m={m:2d}: cuBLAS "
                      f"{t_cublas * 1e3:6.1f} us ({row['cublas_GBps']:5.0f} GB/s), Triton best {timed[best] * 1e3:6.1f} us "
                      f"({row['triton_best_GBps']:5.0f} GB/s) {best}, err {err:.1e}", file=sys.stderr, flush=True)
            ws.clear()
            torch.cuda.empty_cache()
        # per model and m: cuBLAS vs the one Triton configuration best over the whole step, vs the
        # best of both per projection (what a per-shape choice would give)
        for m in rows:
            rs = [r for r in res["rows"] if r["model"] == model and r["m"] == m]
            cub = sum(r["layers"] * r["cublas_ms"] for r in rs)
            step = {c: sum(r["layers"] * r["all"][c] for r in rs) for c in rs[0]["all"]
                    if all(c in r["all"] for r in rs)}
            best = min(step, key=step.get)
            mixed = sum(r["layers"] * min(r["cublas_ms"], r["triton_best_ms"]) for r in rs)
            gb = sum(r["layers"] * r["n"] * r["k"] * 2 for r in rs) / 1e9
            res["steps"][f"{model}_m{m}"] = {"cublas_ms": cub, "triton_ms": step[best], "triton_config": json.loads(best),
                                            "best_per_shape_ms": mixed, "weight_GB": gb}
            print(f"{model} m={m}: projections of one step ({gb:.2f} GB): cuBLAS {cub:.3f} ms "
                  f"({gb / cub:.0f} GB/s), Triton {step[best]:.3f} ms with {best}, best per shape {mixed:.3f} ms",
                  file=sys.stderr, flush=True)
    if a.out:
        write_result(res, a.out, "skinny_bench")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
