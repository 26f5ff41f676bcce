"""What idling between steps costs a tier: the same work run back to back, and after idle gaps.

In a served round each tier idles while the other works (the draft tier through the verify, the
target tier through the draft's block), then must answer at once. This times, on one GPU:
  - a thread's wake-up (threading.Event, and an asyncio loop woken from another thread), which
    every hand-off between the gRPC loop and a tier's step thread pays;
  - a draft block of the real-size EAGLE-3 head (k tokens), a 1B draft model's k-token block and
    the 8B target's one-token step, each after gaps of 0 to 7 ms: wall time, and the span of its
    GPU work (CUDA events), so a slower host and a slower GPU are told apart;
  - the same after gaps during which the GPU is kept busy by one tiny kernel on a side stream
    (`--keep-busy`), which keeps the GPU's clocks up if they are what falls.

    python3 benchmarks/idle_probe.py [--reps 60] [-k 5] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from result_file import write_result  # noqa: E402

GAPS_MS = (0.0, 1.0, 3.0, 7.0)


def wake_us(gap_s: float, n: int = 200) -> dict[str, float]:
    """Median µs from one thread's signal to the waiting thread running (Event) and to a callback
    running on an idle asyncio loop (call_soon_threadsafe), after `gap_s` of idling."""
    ev, done, woke, ev_lat = threading.Event(), threading.Event(), [0], []

    def waiter() -> None:
        for _ in range(n):
            ev.wait()
            woke[0] = time.perf_counter_ns()
            ev.clear()
            done.set()

    t = threading.Thread(target=waiter)
    t.start()
    for _ in range(n):
        time.sleep(gap_s)
        s = time.perf_counter_ns()
        ev.set()
        done.wait()
        done.clear()
        ev_lat.append(woke[0] - s)
    t.join()
    loop = asyncio.new_event_loop()
    lt = threading.Thread(target=loop.run_forever)
    lt.start()
    got, loop_lat = threading.Event(), []
    for _ in range(n):
        time.sleep(gap_s)
        s = time.perf_counter_ns()
        loop.call_soon_threadsafe(lambda s=s: (loop_lat.append(time.perf_counter_ns() - s), got.set()))
        got.wait()
        got.clear()
    loop.call_soon_threadsafe(loop.stop)
    lt.join()
    loop.close()
    return {"event_us": statistics.median(ev_lat) / 1e3, "loop_us": statistics.median(loop_lat) / 1e3}


def spin_rate(dev: torch.device) -> float:
    """Cycles of `torch.cuda._sleep` per ms on this GPU (at its clocks while busy)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000_000)  # warm
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    return 10_000_000 / start.elapsed_time(end)


def after_gaps(fn: Callable[[], object], dev: torch.device, reps: int, keep_busy: bool) -> dict[str, dict[str, float]]:
    """`fn` (ending on a host sync) after each gap: median wall ms and GPU span ms (events)."""
    side = torch.cuda.Stream(dev)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles_per_ms = spin_rate(dev)
    out = {}
    for gap in GAPS_MS:
        walls, spans = [], []
        for _ in range(reps):
            torch.cuda.synchronize(dev)
            if gap:
                if keep_busy:  # one thread block spinning through the gap, ending just before it does
                    with torch.cuda.stream(side):
                        torch.cuda._sleep(int(cycles_per_ms * gap * 0.9))
                time.sleep(gap / 1e3)
            t = time.perf_counter()
            start.record()
            fn()
            end.record()
            walls.append(time.perf_counter() - t)
            end.synchronize()
            spans.append(start.elapsed_time(end))
        out[f"gap{gap:g}ms"] = {"wall_ms": statistics.median(walls) * 1e3, "gpu_span_ms": statistics.median(spans)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    from datetime import datetime, timezone

    res: dict[str, object] = {"benchmark": "idle_probe", "command": " ".join(sys.argv),
                              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "gaps_ms": GAPS_MS, "k": a.k, "context": a.context}
    res["wake"] = {f"gap{g:g}ms": wake_us(g / 1e3) for g in GAPS_MS}
    print(json.dumps(res["wake"]), flush=True)
    if not torch.cuda.is_available():
        print("no GPU: the steps are not timed")
        return 0
    dev = torch.device("cuda")
    res["device"] = torch.cuda.get_device_name(dev)
    from bench_tiers import greedy
    from oracle_eagle import random_eagle3_drafter

    from specsplit.runtime.random_weights import LLAMA_31_8B, LLAMA_32_1B, random_model
    from specsplit.runtime.runner import ModelRunner, StepInput
    from specsplit.speculation.drafters import DraftModelDrafter, DraftRequest
    from specsplit.speculation.eagle.drafter import EagleDrafter

    ctx, k = a.context, a.k
    works: dict[str, Callable[[], object]] = {}
    print("building the EAGLE-3 head, the 1B draft and the 8B target (random weights)", flush=True)
    head = EagleDrafter(random_eagle3_drafter(LLAMA_31_8B, dev, torch.bfloat16, max_model_len=4096,
                                              kv_cache_bytes=512 << 20).runner)
    width, v = head.runner.head.hc.state_size, head.vocab_size
    head.open(1, [(7 * i + 3) % v for i in range(ctx)], greedy())
    head.propose([DraftRequest(1, ctx, [], k, torch.randn(ctx - 1, width).to(torch.bfloat16))])
    one = torch.randn(1, width).to(torch.bfloat16)

    def head_block() -> None:  # the same prefix each time: rolled back to it, one new state, k steps
        head.propose([DraftRequest(1, ctx, [], k, one)])

    works["eagle3_head_block"] = head_block
    cfg, model = random_model(LLAMA_32_1B, dev, torch.bfloat16, seed=1)
    draft = DraftModelDrafter(ModelRunner.from_model(cfg, model, device=dev, max_model_len=4096, kv_cache_bytes=1 << 30))
    draft.open(1, [(7 * i + 3) % v for i in range(ctx)], greedy())
    works["draft_1b_block"] = lambda: draft.propose([DraftRequest(1, ctx, [], k)])
    cfg, model = random_model(LLAMA_31_8B, dev, torch.bfloat16, seed=2)
    target = ModelRunner.from_model(cfg, model, device=dev, max_model_len=4096, kv_cache_bytes=2 << 30)
    target.add(1)
    target.forward([StepInput(1, [(7 * i + 3) % v for i in range(ctx)])])

    def target_step() -> None:
        target.truncate(1, ctx)
        target.forward([StepInput(1, [5])]).argmax(-1).tolist()

    works["target_8b_step"] = target_step
    for name, fn in works.items():
        for _ in range(5):
            fn()  # graphs captured, caches warm
        for keep in (False, True):
            key = f"{name}{'_gpu_kept_busy' if keep else ''}"
            res[key] = after_gaps(fn, dev, a.reps, keep)
            print(key, json.dumps({g: round(r["wall_ms"], 3) for g, r in res[key].items()}), "GPU span",
                  json.dumps({g: round(r["gpu_span_ms"], 3) for g, r in res[key].items()}), flush=True)
    if a.out is not None:
        write_result(res, a.out, "idle_probe")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
