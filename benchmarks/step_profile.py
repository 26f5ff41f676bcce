"""Where a batch-1 decode step's GPU time goes, kernel by kernel (GPU only, random weights).

For each model shape (the Llama-3.1-8B target whole and one rank's shard at TP 2 / TP 4 with
its collectives left out, and the Llama-3.2-1B draft), with cuBLAS for the projections or
the faster of cuBLAS and our `skinny_linear` per shape (what runners do by default): the wall time per greedy decode step (host included), the GPU time of
the step's CUDA graph replayed alone, its weight bytes over the measured copy rate (the
bound), and the kernels of one eager step grouped by kind (projections, norms, rotary + KV
write, attention, activation, LM head, other) with their summed GPU time. The kernels'
sum against the replay shows how much of a step is gaps between kernels.

    python3 benchmarks/step_profile.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpu_bench import copy_bandwidth  # noqa: E402
from gpu_tp_bench import NoComm  # noqa: E402
from result_file import write_result  # noqa: E402

from specsplit.runtime.collective_bench import replay_ms  # noqa: E402
from specsplit.runtime.random_weights import LLAMA_31_8B, LLAMA_32_1B, random_model  # noqa: E402
from specsplit.runtime.runner import BATCH_BUCKETS, ModelRunner, StepInput  # noqa: E402

LINEAR = {"0": "cuBLAS", "1": "Triton", "auto": "faster per shape"}
SHAPES = {"8b": (LLAMA_31_8B, 1), "8b-tp2": (LLAMA_31_8B, 2), "8b-tp4": (LLAMA_31_8B, 4), "1b": (LLAMA_32_1B, 1)}
KINDS = [("norm", ("add_rms_norm", "rms_norm")), ("rotary+kv", ("rope_write_kv",)), ("attention", ("paged_attention",)),
         ("activation", ("silu",)), ("projection", ("skinny", "gemm", "gemv", "nvjet", "cutlass", "xmma", "splitk"))]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def kind_of(name: str) -> str:
    low = name.lower()
    return next((k for k, keys in KINDS if any(s in low for s in keys)), "other")


def kernel_table(runner: ModelRunner, seq: int, token: int, steps: int = 5) -> dict:
    """GPU time per kernel kind of one eager decode step (mean of `steps`), and the top kernels."""
    graphs, runner.graphs = runner.graphs, None  # eager: every kernel its own launch, as profiled
    try:
        runner.forward([StepInput(seq, [token])])
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                runner.forward([StepInput(seq, [token])])
            torch.cuda.synchronize()
    finally:
        runner.graphs = graphs
    kinds: dict[str, float] = defaultdict(float)
    names: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        kind = kind_of(e.name)
        kinds[kind] += us / steps
        names[e.name][0] += us / steps
        names[e.name][1] += 1
    top = sorted(names.items(), key=lambda kv: -kv[1][0])[:12]
    return {"us_by_kind": dict(kinds), "kernels_per_step": sum(n for _, n in names.values()) / steps,
            "sum_us": sum(kinds.values()),
            "top": [{"name": n[:120], "us": v[0], "calls_per_step": v[1] / steps} for n, v in top]}


def measure(name: str, linear: str, bw: float, steps: int) -> dict:
    """One shape with the projections on cuBLAS ("0"), ours ("1") or the faster per shape ("auto")."""
    shape, tp = SHAPES[name]
    dev = torch.device("cuda:0")
    cfg, model = random_model(shape, dev, torch.bfloat16, ctx=NoComm(0, tp) if tp > 1 else None)
    os.environ["SPECSPLIT_SKINNY_LINEAR"] = linear
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    runner = ModelRunner.from_model(cfg, model, device=dev, max_model_len=2048, kv_cache_bytes=2 << 30)
    runner.add(0)
    v = shape["vocab_size"]
    nxt = int(runner.forward([StepInput(0, [t % v for t in range(1000, 1128)])]).argmax(-1)[0])
    first = nxt
    for _pass in ("capture", "timed"):
        runner.truncate(0, 128)
        nxt = first
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            nxt = int(runner.forward([StepInput(0, [nxt])]).argmax(-1)[0])
        wall = (time.perf_counter() - t) / steps * 1000
    key = max((k for k in runner.graphs.graphs if k[0] == BATCH_BUCKETS[0] and k[1] == 1), key=lambda k: k[2])
    replay = replay_ms(runner, key, 20)
    table = kernel_table(runner, 0, nxt)
    bound = weights / bw * 1000
    row = {"shape": name, "linear": LINEAR[linear], "linear_choice": runner.linear_choice, "wall_ms": wall, "replay_ms": replay, "weight_GB": weights / 1e9,
           "bound_ms": bound, "replay_over_bound": replay / bound, **table}
    runner.free(0)
    runner.graphs.release()
    del runner, model
    gc.collect()
    torch.cuda.empty_cache()
    kinds = ", ".join(f"{k} {us:.0f}" for k, us in sorted(table["us_by_kind"].items(), key=lambda kv: -kv[1]))
    log(f"{name:7s} {LINEAR[linear]:16s}: wall {wall:.3f} ms, replay {replay:.3f} ms, bound {bound:.3f} ms "
        f"({replay / bound:.2f}x); eager kernels {table['sum_us']:.0f} us in {table['kernels_per_step']:.0f} kernels: {kinds}")
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--linear", default="0,auto", help="projection kernels to compare: 0 cuBLAS, 1 ours, auto per shape")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    bw = copy_bandwidth(torch.device("cuda:0"))
    res: dict = {"benchmark": "step_profile", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "machine": torch.cuda.get_device_name(), "torch": torch.__version__, "command": " ".join(sys.argv),
                 "copy_GBps": bw / 1e9, "rows": []}
    log(f"copy rate {bw / 1e9:.0f} GB/s")
    for name in a.shapes.split(","):
        for linear in a.linear.split(","):
            res["rows"].append(measure(name, linear, bw, a.steps))
    if a.out:
        write_result(res, a.out, "step_profile")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
