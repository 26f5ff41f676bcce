"""Per-round overhead of the split (gateway + two gRPC streams) against the in-process engine.

One run, same model, prompts and greedy settings:
  - in-process `LLM` with the speculative config (no RPC at all)
  - the three tiers as separate processes on real localhost sockets, pipelining off
  - the same with pipelining on
For each: time per round and tokens/s; for the split, (split round - in-process round) is
the overhead, reported as a share of the split's round time. Outputs are checked identical.

    python benchmarks/split_overhead.py [--model smollm2-135m] [--method draft_model|ngram]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain what a hash map is in two sentences.",
    "Write a Python function that reverses a linked list.",
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def in_process(model: str, spec: dict, max_tokens: int) -> dict:
    from specsplit import LLM, SamplingParams

    llm = LLM(model, speculative_config=spec)
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    outs, rounds, secs = [], 0, 0.0
    for p in PROMPTS:
        t0 = time.perf_counter()
        o = llm.chat([{"role": "user", "content": p}], sp, use_tqdm=False)[0].outputs[0]
        secs += time.perf_counter() - t0
        outs.append(o.token_ids)
        rounds += o.metrics.num_rounds
    n = sum(map(len, outs))
    return {"name": "in-process", "outputs": outs, "rounds": rounds, "seconds": secs, "tok_s": n / secs,
            "round_ms": 1000 * secs / rounds}


def split(model: str, spec: dict, max_tokens: int, pipeline: bool) -> dict:
    from specsplit.client import Client
    from specsplit.launcher import free_port, wait_serving
    from specsplit.sampling.params import SamplingParams

    base = [sys.executable, "-m", "specsplit.cli"]
    tp, dp, gp, hp = (free_port() for _ in range(4))
    env = {**os.environ, "SPECSPLIT_LOG_LEVEL": "warning"}
    s = json.dumps(spec)
    procs = [subprocess.Popen([*base, "target", model, "--host", "127.0.0.1", "--grpc-port", str(tp),
                               "--metrics-port", "0"], env=env),
             subprocess.Popen([*base, "draft", model, "--speculative-config", s, "--host", "127.0.0.1",
                               "--grpc-port", str(dp), "--metrics-port", "0"], env=env)]
    try:
        wait_serving(f"127.0.0.1:{tp}", procs)
        wait_serving(f"127.0.0.1:{dp}", procs)
        gw = [*base, "gateway", model, "--speculative-config", s, "--host", "127.0.0.1", "--port", str(hp),
              "--grpc-port", str(gp), "--target-addresses", f"127.0.0.1:{tp}", "--draft-addresses", f"127.0.0.1:{dp}"]
        if not pipeline:
            gw.append("--no-pipeline")
        procs.append(subprocess.Popen(gw, env=env))
        wait_serving(f"127.0.0.1:{gp}", procs)
        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        outs, rounds, pipelined, secs = [], 0, 0, 0.0
        parts = {"draft_ns": 0, "verify_ns": 0, "overhead_ns": 0}
        with Client(f"127.0.0.1:{gp}") as c:
            list(c.stream_chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=4, temperature=0)))
            for p in PROMPTS:
                t0 = time.perf_counter()
                ids, final = [], None
                for ev in c.stream_chat([{"role": "user", "content": p}], sp):
                    ids += ev.token_ids
                    if ev.finished:
                        final = ev
                secs += time.perf_counter() - t0
                outs.append(ids)
                rounds += final.metrics.num_rounds
                pipelined += final.metrics.num_pipelined_rounds
                for k in parts:
                    parts[k] += getattr(final.metrics, k)
        n = sum(map(len, outs))
        name = "split, pipelined" if pipeline else "split, sequential"
        return {"name": name, "outputs": outs, "rounds": rounds, "seconds": secs, "tok_s": n / secs,
                "round_ms": 1000 * secs / rounds, "pipelined_rounds": pipelined,
                **{k: v / 1e6 / rounds for k, v in parts.items()}}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(20)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="draft_model", choices=["draft_model", "ngram"])
    ap.add_argument("--draft", default=None, help="draft model (default: the target itself)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("-k", type=int, default=4)
    args = ap.parse_args()
    from specsplit.factory import model_folder

    model = str(model_folder(args.model))
    spec = {"method": args.method, "num_speculative_tokens": args.k, "adaptive": False}
    if args.method == "draft_model":
        spec["model"] = str(model_folder(args.draft or args.model))
    log("in-process engine")
    rows = [in_process(model, spec, args.max_tokens)]
    for pipe in (False, True):
        log(f"split tiers, pipelining {'on' if pipe else 'off'}")
        rows.append(split(model, spec, args.max_tokens, pipe))
    base = rows[0]
    print("\n| run | tok/s | ms/round | overhead vs in-process (ms/round) | share of round | identical |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        r["overhead_ms_per_round"] = r["round_ms"] - base["round_ms"]
        r["overhead_share"] = r["overhead_ms_per_round"] / r["round_ms"]
        r["identical"] = r["outputs"] == base["outputs"]
        print(f"| {r['name']} | {r['tok_s']:.2f} | {r['round_ms']:.1f} | {r['overhead_ms_per_round']:.1f} | "
              f"{r['overhead_share']:.1%} | {'yes' if r['identical'] else 'NO'} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"split_overhead_{stamp}.json"
    out.write_text(json.dumps({"benchmark": "split_overhead", "date": stamp, "machine": platform.machine(),
                               "command": " ".join(sys.argv), "spec": spec,
                               "env": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")},
                               "rows": [{k: v for k, v in r.items() if k != "outputs"} for r in rows]}, indent=2))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
