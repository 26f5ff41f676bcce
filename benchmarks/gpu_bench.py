"""GPU benchmark of the target tier against the memory-bandwidth limit (random weights, real shapes).

No real 8B checkpoint reaches the GPU machines, so the models have the real shapes of
Llama-3.1-8B (target) and random bf16 weights. Timing does not depend on the values.

Parts (one run, one machine; select with --parts):
  1  plain decoding, batch 1: ms/token vs the bound (bytes of weights + KV read per step /
     measured device-to-device copy rate), vs Hugging Face `generate` on the same weights
  2  verify step of k+1 = 6 tokens vs the 1-token step, batch 1 and batch 32
  4  tensor parallel (benchmarks/gpu_tp_bench.py): 8B shape at TP = 1, 2, 4 (time per token, its
     host / compute / communication split, logits and greedy tokens vs TP = 1), the 70B shape
     at TP = 4 vs its bound, a TP = 2 target tier's exit on SIGTERM (2 GPUs; all of it: 4)
Results: a JSON file (machine, date, command, each figure with its goal and whether it was
met) under --out, default benchmarks/results/.

    python benchmarks/gpu_bench.py --parts 1,2,4 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

from specsplit.runtime.random_weights import LLAMA_31_8B, random_model
from specsplit.runtime.runner import ModelRunner, StepInput

DT = torch.bfloat16
LAST: dict[str, float] = {}


SKIP_EAGER = False


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def copy_bandwidth(dev: torch.device) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    n = 2 * 2**30
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize(dev)
    t = time.perf_counter()
    for _ in range(20):
        b.copy_(a)
    torch.cuda.synchronize(dev)
    bw = 2 * n * 20 / (time.perf_counter() - t)
    del a, b
    return bw


def make_runner(model, cfg, dev, eager: bool, max_len: int = 4096, backend: str = "auto") -> ModelRunner:
    return ModelRunner.from_model(cfg, model, device=dev, max_model_len=max_len,
                                  kv_cache_bytes=8 * 2**30, enforce_eager=eager, backend=backend)


def decode_ms(runner, prompt_len: int = 128, steps: int = 128, batch: int = 1) -> float:
    """Mean ms per decode step over `steps` greedy steps after a prefill (ids go to the host each step)."""
    ids = list(range(1000, 1000 + prompt_len))
    for s in range(batch):
        runner.add(s)
    logits = runner.forward([StepInput(s, ids) for s in range(batch)])
    first = logits.argmax(-1).tolist()
    # an untimed pass over the same context lengths first: it captures the CUDA graph of
    # every context bucket on the way, as a warmed-up server has them
    for _pass in ("capture", "timed"):
        for s in range(batch):
            runner.truncate(s, prompt_len)
        nxt = first
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            logits = runner.forward([StepInput(s, [nxt[s]]) for s in range(batch)])
            nxt = logits.argmax(-1).tolist()
    dt = (time.perf_counter() - t) / steps * 1000
    graphs = getattr(runner, "graphs", None)
    if graphs is not None and graphs.graphs:  # GPU time of the replay alone: the rest is host overhead
        from specsplit.runtime.runner import BATCH_BUCKETS

        b = next(x for x in BATCH_BUCKETS if x >= batch)  # the graph of this decode step: B bucket, Q = 1,
        key = max((k for k in graphs.graphs if k[0] == b and k[1] == 1), key=lambda k: k[2])  # last context
        g = graphs.graphs[key][0]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(20):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        LAST["replay_ms"] = start.elapsed_time(end) / 20
    for s in range(batch):
        runner.free(s)
    return dt


def step_ms(runner, batch: int, q: int, ctx: int = 256, reps: int = 30) -> float:
    """Time of one forward with q new tokens per sequence at a fixed context (rolled back each time)."""
    for s in range(batch):
        runner.add(s)
    runner.forward([StepInput(s, list(range(500, 500 + ctx))) for s in range(batch)])
    inp = [StepInput(s, list(range(7, 7 + q)), q) for s in range(batch)]
    for _ in range(3):
        runner.forward(inp)
        for s in range(batch):
            runner.truncate(s, ctx)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        out = runner.forward(inp)
        out[0, 0].item()
        for s in range(batch):
            runner.truncate(s, ctx)
    dt = (time.perf_counter() - t) / reps * 1000
    for s in range(batch):
        runner.free(s)
    return dt


def graph_check(dev: torch.device, res: dict) -> None:
    """CUDA-graph replays must give the eager logits: decode, verify, rollback, several batches."""
    shape = dict(LLAMA_31_8B, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=1024)
    cfg, model = random_model(shape, dev, DT, std=0.05)
    g, e = make_runner(model, cfg, dev, eager=False), make_runner(model, cfg, dev, eager=True)
    worst = 0.0
    for b in (1, 3):
        for r in (g, e):
            for s in range(b):
                r.add(s)
            r.forward([StepInput(s, list(range(10 + s, 40 + 3 * s))) for s in range(b)])
        for step in range(12):
            q = 1 if step % 3 else 4
            inp = [StepInput(s, [(step * 7 + s + j) % 1000 for j in range(q)], q) for s in range(b)]
            a, c = g.forward(inp), e.forward(inp)
            worst = max(worst, float((a - c).abs().max()))
            if q > 1:
                for r in (g, e):
                    for s in range(b):
                        r.truncate(s, r.length(s) - 2)
        for r in (g, e):
            for s in range(b):
                r.free(s)
    res["graph_vs_eager_max_abs_diff"] = worst
    res["graph_replays"] = g.graphs.replays if g.graphs else 0
    log(f"CUDA graphs vs eager: max abs logits diff {worst:.2e} over {res['graph_replays']} replays")
    if worst > 5e-2:
        raise AssertionError(f"CUDA graph logits differ from eager by {worst}")


def part1(dev: torch.device, res: dict) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from specsplit.runtime.weights import load_weights

    bw = copy_bandwidth(dev)
    res["copy_bandwidth_GBps"] = bw / 1e9
    log(f"device-to-device copy: {bw / 1e9:.0f} GB/s (read + write)")
    torch.manual_seed(0)
    hf_cfg = LlamaConfig(**LLAMA_31_8B)
    with torch.device(dev):
        torch.set_default_dtype(DT)
        hf = LlamaForCausalLM(hf_cfg).eval()
        torch.set_default_dtype(torch.float32)
    log("HF model built; copying its weights into ours")
    cfg, model = random_model(LLAMA_31_8B, dev, DT)
    load_weights(model, ((k, v) for k, v in hf.state_dict().items()))
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
    avg_ctx = 128 + 128 / 2
    bound_ms = (weight_bytes + kv_per_token * avg_ctx) / bw * 1000
    res["bound_ms_per_token"] = bound_ms
    runner = make_runner(model, cfg, dev, eager=False)
    # sanity: our logits vs HF's on a prompt
    ids = list(range(1000, 1064))
    runner.add(99)
    ours = runner.forward([StepInput(99, ids, 64)]).float()
    runner.free(99)
    with torch.inference_mode():
        ref = hf(torch.tensor([ids], device=dev)).logits[0].float()
    res["logits_max_abs_diff_vs_hf"] = float((ours - ref).abs().max())
    res["argmax_agreement_vs_hf"] = float((ours.argmax(-1) == ref.argmax(-1)).float().mean())
    log(f"logits vs HF: max abs diff {res['logits_max_abs_diff_vs_hf']:.3f}, "
        f"argmax agreement {res['argmax_agreement_vs_hf']:.3f}")
    g = decode_ms(runner)
    res["decode_ms_graphs"] = g
    res["decode_graph_replay_gpu_ms"] = LAST.get("replay_ms")
    log(f"graph replay alone: {LAST.get('replay_ms', 0):.2f} ms GPU time")
    res["attention_backend"] = runner.backend
    sd = make_runner(model, cfg, dev, eager=False, backend="sdpa")
    res["decode_ms_graphs_sdpa"] = decode_ms(sd)
    res["decode_sdpa_replay_gpu_ms"] = LAST.get("replay_ms")
    del sd
    log(f"decode batch 1, {runner.backend}: {g:.2f} ms/token; SDPA: {res['decode_ms_graphs_sdpa']:.2f} ms/token "
        f"(replay {res['decode_sdpa_replay_gpu_ms']:.2f} ms)")
    if not SKIP_EAGER:
        eager = make_runner(model, cfg, dev, eager=True)
        e = decode_ms(eager)
        res["decode_ms_eager"] = e
        del eager
        log(f"decode batch 1: {g:.2f} ms/token (CUDA graphs), {e:.2f} eager; bound {bound_ms:.2f}")
    with torch.inference_mode():
        x = torch.tensor([list(range(1000, 1128))], device=dev)
        hf.generate(x, max_new_tokens=8, do_sample=False)
        torch.cuda.synchronize()
        t = time.perf_counter()
        hf.generate(x, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        torch.cuda.synchronize()
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        hf.generate(x, max_new_tokens=129, min_new_tokens=129, do_sample=False)
        torch.cuda.synchronize()
        t129 = time.perf_counter() - t
    hf_ms = (t129 - t1) / 128 * 1000
    res["hf_generate_ms_per_token"] = hf_ms
    log(f"HF generate: {hf_ms:.2f} ms/token")
    res["goals"]["decode_within_1.25x_of_bound"] = {"value": g / bound_ms, "goal": "<= 1.25", "met": g / bound_ms <= 1.25}
    res["goals"]["decode_3x_faster_than_hf"] = {"value": hf_ms / g, "goal": ">= 3", "met": hf_ms / g >= 3}
    del hf
    part2(runner, res)
    del runner, model
    torch.cuda.empty_cache()


def part2(runner: ModelRunner, res: dict) -> None:
    for b in (1, 32):
        one = step_ms(runner, b, 1)
        six = step_ms(runner, b, 6)
        res[f"verify6_vs_step1_batch{b}"] = {"step1_ms": one, "verify6_ms": six, "ratio": six / one}
        log(f"batch {b}: 1-token step {one:.2f} ms, 6-token verify {six:.2f} ms, ratio {six / one:.2f}")
    r = res["verify6_vs_step1_batch1"]["ratio"]
    res["goals"]["verify6_over_step1_batch1"] = {"value": r, "goal": "<= 1.15", "met": r <= 1.15}


def part4(res: dict, budget_s: float, save: Callable[[], None]) -> None:
    """Tensor parallel: 8B at TP = 1/2/4, 70B shape at TP = 4, exit on SIGTERM (gpu_tp_bench.py)."""
    from gpu_tp_bench import run_tp

    if torch.cuda.device_count() < 2:
        log("part 4 skipped: needs 2 GPUs")
        return
    run_tp(res, dev_type="cuda", budget_s=budget_s, save=save)


def profile_step(dev: torch.device, res: dict) -> None:
    """Kernel-level breakdown of one eager decode step (where the GPU time goes)."""
    from torch.profiler import ProfilerActivity, profile

    cfg, model = random_model(LLAMA_31_8B, dev, DT)
    r = make_runner(model, cfg, dev, eager=True)
    r.add(0)
    r.forward([StepInput(0, list(range(1000, 1128)))])
    for _ in range(3):
        r.forward([StepInput(0, [5])])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            r.forward([StepInput(0, [5])])
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
    print(table)
    res["profile_top"] = table[:6000]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="1,2,4")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--no-eager", action="store_true", help="skip the eager decode (slow, for reference)")
    ap.add_argument("--budget-s", type=float, default=500.0,
                    help="part 4 starts no sub-part that might not end within this many seconds of the start")
    args = ap.parse_args()
    global SKIP_EAGER
    SKIP_EAGER = args.no_eager
    # a `timeout` (SIGTERM) still writes what was measured so far
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt("SIGTERM")))
    started = time.monotonic()
    parts = set(args.parts.split(","))
    dev = torch.device("cuda:0")
    res: dict = {"benchmark": "gpu_bench", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "machine": f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}",
                 "torch": torch.__version__, "command": " ".join(sys.argv), "shape": "Llama-3.1-8B (part 4: also -70B), bf16, random weights",
                 "goals": {}}
    out = Path(args.out)
    name = out / f"gpu_bench_{res['date'].replace(':', '').replace('+0000', 'Z')}.json"

    def save() -> None:
        out.mkdir(parents=True, exist_ok=True)
        name.write_text(json.dumps(res, indent=2, default=str))

    try:
        graph_check(dev, res)
        if "p" in parts:
            profile_step(dev, res)
        if "1" in parts:
            part1(dev, res)
        elif "2" in parts:
            cfg, model = random_model(LLAMA_31_8B, dev, DT)
            part2(make_runner(model, cfg, dev, eager=False), res)
        if "4" in parts:
            part4(res, args.budget_s - (time.monotonic() - started), save)
    finally:
        save()
        print(json.dumps({k: v for k, v in res.items() if k not in ("profile_top", "tp_tier_sigterm")}, indent=2,
                         default=str))
        log(f"wrote {name}")
    return 0


if __name__ == "__main__":
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast is off on these machines and stays off
    os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # results are written: no interpreter teardown left to wait on a communicator
