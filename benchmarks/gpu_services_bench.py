"""GPU benchmark of speculation through the real gateway and services (issue 4, parts 3 and 5).

No real large checkpoint reaches the GPU machines, so the models have the real shapes of
Llama-3.1-8B (target) and Llama-3.2-1B (draft) and random weights, and the acceptance rate is
set on purpose: a benchmark-only oracle drafter (benchmarks/oracle.py) runs the real draft
model forward for every token it proposes, so its cost is real, but proposes the target's own
greedy continuation (recorded from plain decoding through the same gateway), each token
replaced by a wrong one with probability 1 - alpha. The target's weights are random with one
structure: its greedy next token wins by a wide margin, so bf16 rounding cannot make plain and
speculative outputs differ (see `confident_random_model`).

Each tier is its own process on real localhost sockets (benchmarks/bench_tiers.py): target on
one GPU, draft on the other, gateways on the CPU; this process is the client.
  3  one session at a time, alpha in --alphas, k fixed: plain decoding vs speculation with and
     without pipelining; tokens/s, speedup, pipelined-guess hit rate, next to the docs/architecture.md
     performance model computed from the step times measured in the tier processes.
  5  1, 8, 32, 64 concurrent sessions, speculation (adaptive k, pipelined) on and off:
     aggregate tokens/s and p50/p99 time per output token.
Every output is checked token-identical to plain decoding. Results: a JSON file and plots
under --out (default benchmarks/results/).

    python benchmarks/gpu_services_bench.py --out $OUT                       # 2 GPUs, 8B/1B shapes
    python benchmarks/gpu_services_bench.py --shape tiny --device cpu --max-tokens 16 --loads 1,4
    python benchmarks/gpu_services_bench.py --method eagle3 --parts 6 --alphas 0.8   # a real-size EAGLE-3 head
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # bench_tiers, and specsplit without an install

import bench_tiers  # noqa: E402
import gpu_services_report  # noqa: E402
import grpc  # noqa: E402
import numpy as np  # noqa: E402
import oracle_eagle  # noqa: E402
import trace_report  # noqa: E402

from specsplit.proto.v1 import gateway_pb2, gateway_pb2_grpc  # noqa: E402
from specsplit.sampling.params import SamplingParams  # noqa: E402
from specsplit.serving.convert import params_to_pb  # noqa: E402
from specsplit.speculation.adaptive import expected_tokens  # noqa: E402
from specsplit.speculation.branches import check_max_branches  # noqa: E402

SHAPE_NOTE = {"llama8b": "the real shapes of Llama-3.1-8B (target) and Llama-3.2-1B (draft)",
              "tiny": "tiny test shapes (a CPU check of the benchmark itself, not a measurement)"}
NOTE = ("Models have {shape} with random weights (the target's built so that its greedy choice cannot flip on "
        "rounding). Acceptance is set on purpose: a benchmark-only oracle drafter runs the real draft model forward "
        "for every token but proposes the target's own greedy continuation (recorded from plain decoding), each token "
        "replaced by a wrong one with probability 1 - alpha.")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- tier processes --------------------------------------------------------------------------


class Tier:
    """One bench_tiers.py process: its ready message, then JSON commands over stdin/stdout."""

    def __init__(self, name: str, args: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.proc = subprocess.Popen([sys.executable, str(HERE / "bench_tiers.py"), *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.ready: dict[str, Any] = {}
        self.ports: dict[str, int] = {}  # gateways: port of each gateway by mode

    def _pump(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self._lines.put(line)
        self._lines.put(None)

    def read(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:  # a dead tier whose children still hold its stdout open must not look slow
            try:
                line = self._lines.get(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
                break
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} tier exited with code {self.proc.returncode}") from None
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{self.name} tier did not answer within {timeout_s:.0f}s") from None
        if line is None:
            raise RuntimeError(f"{self.name} tier exited with code {self.proc.wait()}")
        return json.loads(line)

    def wait_ready(self, timeout_s: float) -> dict[str, Any]:
        self.ready = self.read(timeout_s)
        return self.ready

    def call(self, **cmd: Any) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(cmd) + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return self.read(120.0)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # type: ignore[union-attr]
                self.proc.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()


def device_env(device: str, count: int = 1) -> tuple[dict[str, str], str]:
    """Give a tier process only its GPUs (CUDA_VISIBLE_DEVICES), so it creates no context elsewhere."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not device.startswith("cuda"):
        return env, device
    idx = int(device.split(":")[1]) if ":" in device else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(64)]
    env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[idx : idx + count])
    return env, "cuda:0"


# ---- client ----------------------------------------------------------------------------------


@dataclass
class Run:
    """One request as the client saw it."""

    prompt: int  # index into the prompt list
    t_start: float
    deltas: list[tuple[float, int]] = field(default_factory=list)  # (arrival, tokens in the message)
    ids: list[int] = field(default_factory=list)
    t_end: float | None = None  # None: cancelled before it finished
    stats: Any = None  # the gateway's SpecStats of a finished request

    def tpot_s(self) -> float | None:
        """Time per output token after the first message: (last - first) / (tokens - first message's)."""
        if self.t_end is None or len(self.deltas) < 2:
            return None
        return (self.deltas[-1][0] - self.deltas[0][0]) / max(1, len(self.ids) - self.deltas[0][1])


async def generate(stub: Any, ids: list[int], idx: int, max_tokens: int, runs: list[Run] | None = None) -> Run:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    req = gateway_pb2.GenerateRequest(params=params_to_pb(params))
    req.token_ids.ids.extend(ids)
    run = Run(idx, time.perf_counter())
    if runs is not None:
        runs.append(run)
    call = stub.Generate(req, timeout=900.0)
    try:
        async for msg in call:
            now = time.perf_counter()
            if msg.token_ids:
                run.deltas.append((now, len(msg.token_ids)))
                run.ids.extend(msg.token_ids)
            if msg.HasField("usage"):
                run.stats, run.t_end = msg.stats, now
    finally:
        call.cancel()
    return run


def spec_totals(runs: list[Run]) -> dict[str, float]:
    """The gateway's per-request stats summed over finished requests, as per-round figures."""
    done = [r for r in runs if r.stats is not None]
    tot = {f: sum(getattr(r.stats, f) for r in done) for f in
           ("rounds", "pipelined_rounds", "drafted_ahead_rounds", "drafted_tokens", "accepted_tokens", "draft_ns", "verify_ns", "overhead_ns")}
    rounds = max(1, tot["rounds"])
    tokens = sum(len(r.ids) for r in done)
    return {"rounds": tot["rounds"], "tokens_per_round": tokens / rounds,
            "mean_block": tot["drafted_tokens"] / rounds,
            "acceptance_rate": tot["accepted_tokens"] / tot["drafted_tokens"] if tot["drafted_tokens"] else None,
            # the first round of a request (prefill) can never use a pipelined block
            "pipelined_share": tot["pipelined_rounds"] / max(1, tot["rounds"] - len(done)),
            # the tree of guesses: rounds with a block drafted ahead, and the share whose guess held
            "drafted_ahead_rounds": tot["drafted_ahead_rounds"],
            "branch_hit_rate": tot["pipelined_rounds"] / tot["drafted_ahead_rounds"] if tot["drafted_ahead_rounds"] else None,
            "gateway_draft_ms_per_round": tot["draft_ns"] / 1e6 / rounds,
            "gateway_verify_ms_per_round": tot["verify_ns"] / 1e6 / rounds,
            "gateway_overhead_ms_per_round": tot["overhead_ns"] / 1e6 / rounds}


def check_outputs(runs: list[Run], refs: list[list[int]]) -> dict[str, Any]:
    done = [r for r in runs if r.t_end is not None]
    bad = [r for r in done if r.ids != refs[r.prompt]]
    first = []
    for r in bad[:5]:
        ref = refs[r.prompt]
        first.append(next((i for i, (x, y) in enumerate(zip(r.ids, ref, strict=False)) if x != y), min(len(r.ids), len(ref))))
    return {"checked": len(done), "identical": len(done) - len(bad), "first_difference_at": first}


def pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


# ---- part 3 ----------------------------------------------------------------------------------


async def single_session(stub: Any, prompts: list[list[int]], refs: list[list[int]], max_tokens: int, warm: int,
                         passes: int) -> dict[str, Any]:
    """Prompts one after another; `warm` passes first (CUDA graph capture), then `passes` timed."""
    runs: list[Run] = []
    for p in range(warm + passes):
        for i, ids in enumerate(prompts):
            r = await generate(stub, ids, i, max_tokens)
            if p >= warm:
                runs.append(r)
    tokens = sum(len(r.ids) for r in runs)
    secs = sum(r.t_end - r.t_start for r in runs)  # type: ignore[operator]
    tpots = [t for r in runs if (t := r.tpot_s()) is not None]
    return {"requests": len(runs), "tokens": tokens, "seconds": secs, "tok_s": tokens / secs,
            "ms_per_token": 1000 * secs / tokens, "tpot_ms_mean": 1000 * float(np.mean(tpots)) if tpots else None,
            **spec_totals(runs), "outputs": check_outputs(runs, refs)}


def predict(alpha: float, k: int, t1: float, tt: float, td: float, o: float, beta: float = 0.0) -> dict[str, float]:
    """The performance model of docs/architecture.md (times in ms); plain decoding through the gateway costs t1 + o per token.
    The pipelined block is ready when the tree of guesses covered the verdict: alpha^(k+1) + beta (1 - alpha^k)."""
    e = expected_tokens(alpha, k)
    seq = k * td + tt + o
    p = alpha ** (k + 1) + beta * (1 - alpha**k)
    pipe = p * (tt + o) + (1 - p) * seq
    # refined: the pipelined block takes k+1 draft steps beside the verify, and the gateway waits for it
    # before drafting afresh on a miss
    side = max(tt, (k + 1) * td)
    pipe_refined = p * (side + o) + (1 - p) * (side + k * td + o)
    plain = t1 + o
    return {"expected_tokens_per_round": e, "pipelined_hit_rate": p, "sequential_round_ms": seq,
            "pipelined_round_ms": pipe, "sequential_speedup": e * plain / seq, "pipelined_speedup": e * plain / pipe,
            "pipelined_speedup_refined": e * plain / pipe_refined}


def goal(value: float | None, text: str, met: bool) -> dict[str, Any]:
    return {"value": value, "goal": text, "met": bool(met)}


async def part3(a: argparse.Namespace, ports: dict[str, int], draft: Tier, target: Tier, prompts: list[list[int]],
                refs: list[list[int]], timing: dict[str, float], res: dict) -> None:
    n = a.prompts
    out: dict[str, Any] = {"k": a.k, "max_tokens": a.max_tokens, "prompts": n, "passes": a.repeats, "rows": []}
    res["part3"] = out
    target.call(stats=True)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['plain']}") as ch:
        plain = await single_session(gateway_pb2_grpc.GatewayStub(ch), prompts[:n], refs, a.max_tokens, 1, a.repeats)
    t = target.call(stats=True)
    plain["target_mean_step_ms"], plain["target_graphs_captured"] = t["mean_step_ms"], t["graphs_captured_since"]
    t1, tt, td = timing["step1_ms"], timing[f"verify{a.k + 1}_ms"], timing["draft_token_ms"]
    o = max(0.0, plain["ms_per_token"] - t1)
    out["model_inputs_ms"] = {"t1_step": t1, "t_verify": tt, "t_draft_per_token": td, "o_overhead": o,
                              "note": "t1, t_verify (k+1 tokens), t_draft measured in the tier processes at batch 1, "
                                      "context prompt_len + max_tokens/2; o = plain ms/token through the gateway - t1"}
    out["model"] = ("docs/architecture.md: E = (1 - a^(k+1)) / (1 - a); sequential round = k t_d + t_t + o; pipelined round = "
                    "p (t_t + o) + (1 - p) (k t_d + t_t + o), p = a^(k+1); speedup = E (t_1 + o) / round. "
                    "Refined (info): pipelined hit round = max(t_t, (k+1) t_d) + o, miss = that + k t_d")
    out["pipelined_share_note"] = ("rounds served by the pipelined block, of all rounds after the prefill; the one "
                                   "right after the prefill guesses a single token (hit rate alpha), so short "
                                   "outputs show more than alpha^(k+1)")
    out["plain"] = plain
    log(f"part 3 plain: {plain['tok_s']:.1f} tok/s ({plain['ms_per_token']:.2f} ms/token; step {t1:.2f} ms, o {o:.2f} ms)")
    for alpha in a.alphas:
        draft.call(alpha=alpha)
        for mode in ("sequential", "pipelined"):
            draft.call(stats=True, reset=True)
            target.call(stats=True)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ports[mode]}") as ch:
                r = await single_session(gateway_pb2_grpc.GatewayStub(ch), prompts[:n], refs, a.max_tokens, 1, a.repeats)
            t = target.call(stats=True)
            r["target_mean_step_ms"], r["target_graphs_captured"] = t["mean_step_ms"], t["graphs_captured_since"]
            pred = predict(alpha, a.k, t1, tt, td, o, a.beta[-1])
            key = "pipelined_speedup" if mode == "pipelined" else "sequential_speedup"
            r.update(alpha=alpha, mode=mode, speedup=r["tok_s"] / plain["tok_s"], predicted_speedup=pred[key],
                     share_of_prediction=r["tok_s"] / plain["tok_s"] / pred[key], prediction=pred,
                     oracle=draft.call(stats=True, reset=True))
            out["rows"].append(r)
            log(f"part 3 alpha {alpha} {mode}: {r['tok_s']:.1f} tok/s, {r['speedup']:.2f}x (model {pred[key]:.2f}x), "
                f"{r['tokens_per_round']:.2f} tok/round, pipelined {r['pipelined_share']:.0%} "
                f"(model {pred['pipelined_hit_rate']:.0%}), identical {r['outputs']['identical']}/{r['outputs']['checked']}")
    g = res["goals"]
    rows = {(r["alpha"], r["mode"]): r for r in out["rows"]}
    if (0.8, "pipelined") in rows:
        pipe, seq = rows[(0.8, "pipelined")], rows[(0.8, "sequential")]
        for m, r in (("pipelined", pipe), ("sequential", seq)):
            g[f"part3_alpha0.8_{m}_speedup"] = goal(r["speedup"], ">= 2.0", r["speedup"] >= 2.0)
            g[f"part3_alpha0.8_{m}_share_of_model"] = goal(r["share_of_prediction"], ">= 0.90",
                                                            r["share_of_prediction"] >= 0.9)
        g["part3_alpha0.8_pipelined_over_sequential"] = goal(pipe["tok_s"] / seq["tok_s"], "> 1.0",
                                                             pipe["tok_s"] > seq["tok_s"])
    checked = sum(r["outputs"]["checked"] for r in out["rows"])
    same = sum(r["outputs"]["identical"] for r in out["rows"])
    g["part3_lossless"] = goal(same / max(1, checked), "== 1 (every output token-identical to plain)", same == checked)
    save(res)


# ---- part 6: the direct round against the in-process baseline (issue 10) ----------------------

PART6_MODES = ("plain", "direct-plain", "pipelined", "direct-sequential", "direct-pipelined", "direct-adaptive")
TIMELINE_PARTS = (
    ("verify step (tier: GPU step + host work of the verifier)", "verify_ns"),
    ("verify batch queue", "verify_queue_ns"),
    ("verify hop (RPC transit, or the batcher's thread hand-off)", None),
    ("draft step (draft tier)", "draft_ns"),
    ("draft batch queue", "draft_queue_ns"),
    ("draft tier's code around its step (reading the request, batcher hand-off, reply)", None),
    ("waiting for the block drafted ahead after the verdict (matched or not)", "ahead_wait_ns"),
    ("draft RPC transit (both gRPC stacks, both ways)", None),
    ("loop code (choosing k, commit, bookkeeping)", None),
)


def timeline(t: dict[str, int], client_ms_per_round: float) -> dict[str, Any]:
    """One round at batch 1, in ms: the parts the loop measured, and their sum against the round
    time the client measured independently. Only waits on the round's path count: a draft step
    that ran beside the verify (a pipelined block) costs the round nothing."""
    n = max(1, t.get("rounds", 0))
    ms = {k: t.get(k, 0) / n / 1e6 for k in ("round_ns", "verify_ns", "verify_wait_ns", "verify_queue_ns",
                                             "draft_wait_ns", "draft_ns", "draft_queue_ns", "draft_handled_ns",
                                             "ahead_wait_ns")}
    draft_on_path = ms["draft_ns"]  # the loop records it only for blocks it waited for
    draft_queue_on_path = ms["draft_queue_ns"]
    parts = {
        TIMELINE_PARTS[0][0]: ms["verify_ns"],
        TIMELINE_PARTS[1][0]: ms["verify_queue_ns"],
        TIMELINE_PARTS[2][0]: max(0.0, ms["verify_wait_ns"] - ms["verify_ns"] - ms["verify_queue_ns"]),
        TIMELINE_PARTS[3][0]: draft_on_path,
        TIMELINE_PARTS[4][0]: draft_queue_on_path,
        # the draft tier reports its whole handling of each request it answered on the path
        TIMELINE_PARTS[5][0]: max(0.0, ms["draft_handled_ns"] - draft_on_path - draft_queue_on_path),
        TIMELINE_PARTS[6][0]: ms["ahead_wait_ns"],
        TIMELINE_PARTS[7][0]: max(0.0, ms["draft_wait_ns"] - ms["ahead_wait_ns"]
                                  - max(ms["draft_handled_ns"], draft_on_path + draft_queue_on_path)),
        TIMELINE_PARTS[8][0]: max(0.0, ms["round_ns"] - ms["verify_wait_ns"] - ms["draft_wait_ns"]),
    }
    parts["gateway relay + streaming to the client (beside the next round in direct mode)"] = \
        t.get("relay_ns", 0) / n / 1e6
    total = sum(v for k, v in parts.items() if not k.startswith("gateway relay"))
    return {"rounds": t.get("rounds", 0), "parts_ms": parts, "sum_of_parts_ms": total,
            "client_ms_per_round": client_ms_per_round,
            "sum_over_client": total / client_ms_per_round if client_ms_per_round else None}


async def part6(a: argparse.Namespace, ports: dict[str, int], draft: Tier, target: Tier, prompts: list[list[int]],
                refs: list[list[int]], timing: dict[str, float], res: dict) -> None:
    n = a.prompts
    base = timing["inprocess_plain_ms_per_token"]
    out: dict[str, Any] = {"k": a.k, "max_tokens": a.max_tokens, "prompts": n, "passes": a.repeats,
                           "inprocess_plain_ms_per_token": base, "rows": []}
    res["part6"] = out

    async def one(mode: str, alpha: float | None) -> dict[str, Any]:
        if alpha is not None:
            draft.call(alpha=alpha)
            draft.call(stats=True, reset=True)
        target.call(stats=True)
        a.gws.call(timeline=mode)  # reset
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports[mode]}") as ch:
            stub = gateway_pb2_grpc.GatewayStub(ch)
            for i, ids in enumerate(prompts[:n]):  # warm-up pass (CUDA graphs of every context bucket)
                await generate(stub, ids, i, a.max_tokens)
            a.gws.call(timeline=mode)
            target.call(stats=True)
            draft.call(stats=True)
            t_start = time.perf_counter_ns()  # the tiers' trace events (SPECSPLIT_TRACE) share this clock
            r = await single_session(stub, prompts[:n], refs, a.max_tokens, 0, a.repeats)
            r["trace_window_ns"] = [t_start, time.perf_counter_ns()]
        t = target.call(stats=True)
        d = draft.call(stats=True)
        # graphs captured during the timed passes: a capture (tens of ms) lands on a round's path
        r["graphs_captured"] = {"target": t["graphs_captured_since"], "draft": d["draft_graphs_captured"]}
        tl = a.gws.call(timeline=mode)
        r.update(mode=mode, alpha=alpha, beta=a.beta[-1], target_mean_step_ms=t["mean_step_ms"],
                 over_inprocess_plain=base / r["ms_per_token"],
                 timeline=timeline(tl, r["ms_per_token"] * r["tokens_per_round"]))
        out["rows"].append(r)
        log(f"part 6 {mode} alpha {alpha}: {r['tok_s']:.1f} tok/s = {r['over_inprocess_plain']:.2f}x in-process plain "
            f"({r['tokens_per_round']:.2f} tok/round, pipelined {r['pipelined_share']:.0%}, drafted ahead "
            f"{r['drafted_ahead_rounds']} rounds, branch hits {r['branch_hit_rate'] or 0:.0%}, identical "
            f"{r['outputs']['identical']}/{r['outputs']['checked']}, graphs captured {r['graphs_captured']}); timeline "
            + ", ".join(f"{k.split(' (')[0]} {v:.2f}" for k, v in r["timeline"]["parts_ms"].items())
            + f"; sum {r['timeline']['sum_of_parts_ms']:.2f} vs client {r['timeline']['client_ms_per_round']:.2f} ms")
        save(res)
        return r

    rows: dict[tuple[str, float | None], dict[str, Any]] = {}
    wanted = a.modes or PART6_MODES
    for mode in ("plain", "direct-plain"):
        if mode in wanted:
            rows[(mode, None)] = await one(mode, None)
    for alpha in a.alphas:
        for mode in ("pipelined", "direct-sequential", "direct-pipelined", "direct-adaptive"):
            if mode in wanted:
                rows[(mode, alpha)] = await one(mode, alpha)
    by_beta = {a.beta[-1]: rows.get(("direct-pipelined", 0.8))}
    if ("direct-pipelined", 0.8) in rows:  # the tree of guesses at the other betas (sequential rounds never branch)
        for b in a.beta[:-1]:
            draft.call(beta=b)
            by_beta[b] = await one("direct-pipelined", 0.8)
            by_beta[b]["beta"] = b
        draft.call(beta=a.beta[-1])
    g = res["goals"]
    for alpha, goal_v in ((0.8, 2.5), (0.6, 1.6)):
        cand = [rows[(m, alpha)] for m in ("direct-pipelined", "direct-adaptive", "direct-sequential")
                if (m, alpha) in rows]
        if cand:
            best = max(cand, key=lambda r: r["tok_s"])
            g[f"served_spec_over_inprocess_plain_alpha{alpha}"] = goal(
                best["over_inprocess_plain"], f">= {goal_v} ({best['mode']})", best["over_inprocess_plain"] >= goal_v)
    plain_direct = rows.get(("direct-plain", None))
    if plain_direct is not None:
        ratio = plain_direct["ms_per_token"] / base
        g["gateway_plain_over_inprocess_plain"] = goal(ratio, "<= 1.10 (time per token, direct round)", ratio <= 1.10)
    step_ratio = plain_direct["target_mean_step_ms"] / timing["engine_step_ms"] \
        if plain_direct is not None and timing.get("engine_step_ms") else None
    if step_ratio is not None:
        g["target_tier_step_over_engine_step"] = goal(step_ratio, "<= 1.05 (mean step while serving plain ÷ "
                                                      "the same runner's step in process)", step_ratio <= 1.05)
    if timing.get("draft_bound_ms"):
        dr = timing["draft_token_ms"] / timing["draft_bound_ms"]
        g["draft_token_over_bound"] = goal(dr, "<= 1.3", dr <= 1.3)
    if {("direct-pipelined", 0.8), ("direct-sequential", 0.8)} <= rows.keys():
        for b, r in sorted(by_beta.items()):
            pr = r["tok_s"] / rows[("direct-sequential", 0.8)]["tok_s"]
            key = "pipelined_over_sequential_alpha0.8" + ("" if b == a.beta[-1] else f"_beta{b:g}")
            g[key] = goal(pr, f">= 1.25 (oracle beta = {b:g}: P(the draft's top-2 is the target's token | top-1 "
                              f"wrong); pipelined {r['pipelined_share']:.0%} of rounds)", pr >= 1.25)
    checked = sum(r["outputs"]["checked"] for r in out["rows"])
    same = sum(r["outputs"]["identical"] for r in out["rows"])
    g["lossless"] = goal(same / max(1, checked), "== 1 (every output token-identical to plain)", same == checked)
    save(res)


# ---- part 5 ----------------------------------------------------------------------------------


async def load_level(stub: Any, prompts: list[list[int]], refs: list[list[int]], sessions: int, max_tokens: int,
                     warmup_s: float, measure_s: float) -> dict[str, Any]:
    """`sessions` clients, each sending one request after another; measured in a window after warm-up."""
    runs: list[Run] = []
    t0 = time.perf_counter()
    w0, w1 = t0 + warmup_s, t0 + warmup_s + measure_s

    errors: list[str] = []

    async def client(i: int) -> None:
        j = i
        while time.perf_counter() < w1:
            try:
                await generate(stub, prompts[j % len(prompts)], j % len(prompts), max_tokens, runs)
            except grpc.aio.AioRpcError as e:  # counted, and the client goes on (e.g. 429 under overload)
                errors.append(f"{e.code().name}: {e.details()}"[:300])
                await asyncio.sleep(0.05)
            j += sessions

    tasks = [asyncio.ensure_future(client(i)) for i in range(sessions)]
    await asyncio.sleep(w1 - time.perf_counter())
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    tokens = sum(n for r in runs for (t, n) in r.deltas if w0 <= t <= w1)
    inside = [r for r in runs if r.t_start >= w0 and r.t_end is not None and r.t_end <= w1]
    if not inside:  # requests longer than the window: use every finished one
        inside = [r for r in runs if r.t_end is not None]
    tpot = [1000 * t for r in inside if (t := r.tpot_s()) is not None]
    itl = []  # per token: the gap before its message, shared by the message's tokens
    for r in inside:
        for (ta, _), (tb, nb) in zip(r.deltas, r.deltas[1:], strict=False):
            itl += [1000 * (tb - ta) / nb] * nb
    ttft = [1000 * (r.deltas[0][0] - r.t_start) for r in inside if r.deltas]
    return {"sessions": sessions, "agg_tok_s": tokens / measure_s, "tokens_in_window": tokens,
            "requests_in_window": len(inside), "tpot_ms_p50": pct(tpot, 50), "tpot_ms_p99": pct(tpot, 99),
            "itl_ms_p50": pct(itl, 50), "itl_ms_p99": pct(itl, 99), "ttft_ms_p50": pct(ttft, 50),
            "errors": len(errors), "first_errors": errors[:3], **spec_totals(inside), "outputs": check_outputs(runs, refs)}


async def part5(a: argparse.Namespace, ports: dict[str, int], draft: Tier, target: Tier, prompts: list[list[int]],
                refs: list[list[int]], res: dict) -> None:
    alpha = a.load_alpha
    draft.call(alpha=alpha)
    out: dict[str, Any] = {"alpha": alpha, "k_max": a.k, "speculative_gateway": a.load_gateway,
                           "max_tokens": a.max_tokens, "warmup_s": a.load_warmup_s, "measure_s": a.load_seconds,
                           "distinct_prompts": len(prompts), "rows": []}
    res["part5"] = out
    out["gathers"] = a.load_gather
    for n in a.loads:
        if time.perf_counter() + 2 * len(a.load_gather) * (a.load_warmup_s + a.load_seconds + 3) > a.deadline:
            log(f"part 5: load {n} and above skipped: --time-budget-s would be exceeded")
            out["skipped_loads"] = [m for m in a.loads if m >= n]
            break
        for gather in a.load_gather:
            await load_pair(a, ports, draft, target, prompts, refs, res, n, gather)
    checked = sum(r["outputs"]["checked"] for r in out["rows"])
    same = sum(r["outputs"]["identical"] for r in out["rows"])
    res["goals"]["part5_lossless"] = goal(same / max(1, checked), "== 1", same == checked)


async def load_pair(a: argparse.Namespace, ports: dict[str, int], draft: Tier, target: Tier, prompts: list[list[int]],
                    refs: list[list[int]], res: dict, n: int, gather: float) -> None:
    """Plain, then speculation, at `n` sessions, with both tiers holding steps for `gather` of a step."""
    out, pair = res["part5"], {}
    draft.call(gather=gather)
    target.call(gather=gather)
    plain_gw = "direct-plain" if a.load_gateway.startswith("direct") else "plain"
    runs = [("plain", plain_gw, "auto")] + [("speculative", a.load_gateway, g) for g in a.load_governor]
    for mode, gw, governor in runs:
        target.call(governor=governor)
        t0 = target.call(stats=True)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports[gw]}") as ch:
            r = await load_level(gateway_pb2_grpc.GatewayStub(ch), prompts, refs, n, a.max_tokens,
                                 a.load_warmup_s, a.load_seconds)
        t = target.call(stats=True)  # steps since the call above
        r["target_mean_batch"], r["target_mean_step_ms"] = t["mean_batch"], t["mean_step_ms"]
        r["target_graphs_captured"] = t["graphs_captured_since"]  # in warm-up or window: capture stalls
        r["target_graphs_total"] = t["graphs"]
        r["target_gather_waits"], r["target_gather_timeouts"] = t["gather_waits_since"], t["gather_timeouts_since"]
        r["mode"], r["gather"], r["governor"] = mode, gather, governor
        r["governor_epochs"] = {"drafting": t["governor_epochs_drafting"] - t0["governor_epochs_drafting"],
                                "plain": t["governor_epochs_plain"] - t0["governor_epochs_plain"]}
        pair[mode if governor == a.load_governor[-1] or mode == "plain" else f"{mode}_{governor}"] = r
        out["rows"].append(r)
        log(f"part 5 load {n} {mode} gather {gather:g} governor {governor} {r['governor_epochs']}: "
            f"{r['agg_tok_s']:.1f} tok/s, TPOT p50 {r['tpot_ms_p50'] or 0:.2f} ms "
            f"p99 {r['tpot_ms_p99'] or 0:.2f} ms, block {r['mean_block']:.2f}, target batch "
            f"{r['target_mean_batch']:.1f} ({r['target_mean_step_ms']:.2f} ms/step, "
            f"{r['target_graphs_captured']:.0f} graphs captured), {r['errors']} errors, identical {r['outputs']['identical']}/{r['outputs']['checked']}")
        await asyncio.sleep(1.0)  # let cancelled sessions close before the next level
    save(res)
    for name, r in pair.items():
        if name == "plain":
            continue
        ratio = r["agg_tok_s"] / max(pair["plain"]["agg_tok_s"], 1e-9)
        key = (f"load{n}_spec_over_plain" + ("" if gather == a.load_gather[-1] else f"_gather{gather:g}")
               + ("" if name == "speculative" else f"_governor_{r['governor']}"))
        res["goals"][key] = goal(ratio, f">= 0.95 (tiers' --step-gather {gather:g}, load governor {r['governor']})",
                                 ratio >= 0.95)


# ---- main ------------------------------------------------------------------------------------


def floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--parts", default="3,5")
    ap.add_argument("--modes", type=lambda s: tuple(m for m in s.split(",") if m), default=None,
                    help=f"part 6: only these gateway modes (default: all of {','.join(PART6_MODES)})")
    ap.add_argument("--shape", choices=sorted(bench_tiers.SHAPES), default="llama8b")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--target-gpu", type=int, default=0)
    ap.add_argument("--draft-gpu", type=int, default=1, help="the same as --target-gpu on a 1-GPU machine")
    ap.add_argument("--target-tp", type=int, default=1,
                    help="tensor-parallel target on GPUs target-gpu .. target-gpu + N - 1 (keep the draft off them)")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--method", choices=["draft_model", "eagle3"], default="draft_model",
                    help="eagle3: the oracle over a real-size EAGLE-3 head (benchmarks/oracle_eagle.py), which drafts "
                    "from the target states the target tier returns; the draft model is not used")
    ap.add_argument("--target-weights", choices=["confident", "random"], default="confident",
                    help="random: plain random weights, whose greedy output may flip on rounding")
    ap.add_argument("--alphas", type=floats, default=[0.6, 0.8], help="part 3 acceptance rates")
    ap.add_argument("--beta", type=floats, default=[0.0],
                    help="the oracle's beta: P(its top-2 is the target's token | its top-1 is wrong), which the tree "
                         "of guesses branches on; a list: every part runs at the last, part 6 also runs "
                         "direct-pipelined at alpha 0.8 for the others (e.g. 0,0.6: beta 0 and the Qwen pair's)")
    ap.add_argument("--draft-inline", choices=["on", "off"], default="on",
                    help="a lone session's draft step on the draft tier's loop thread (on, the default) or its "
                         "worker thread (off: the hand-off the tier made before), for A/B runs")
    ap.add_argument("--max-branches", type=int, default=0, help="the gateways' --max-branches: at most this many "
                    "outcomes of a verify drafted ahead for (1 = only the all-accepted guess), 1..64; 0 = every one "
                    "the draft guesses")
    ap.add_argument("--load-alpha", type=float, default=None, help="part 5 (default: 0.8 if in --alphas, else the largest)")
    ap.add_argument("-k", type=int, default=5, help="block length (part 5: the most adaptive k may choose)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=4, help="part 3 prompts (each run once per pass)")
    ap.add_argument("--repeats", type=int, default=2, help="part 3 timed passes (after one warm-up pass)")
    ap.add_argument("--loads", type=ints, default=[1, 8, 32, 64])
    ap.add_argument("--load-governor", type=lambda s: [g for g in s.split(",") if g], default=["auto"],
                    help="part 5: the target's load governor for the speculative runs, one run each: auto (the "
                    "default), on (drafting always allowed), off (never); the last one gives the goals")
    ap.add_argument("--load-gather", type=floats, default=[0.25], help="part 5: the tiers' --step-gather values "
                    "to run each load at (the last one gives the goals; 0 = steps never wait for sessions)")
    ap.add_argument("--load-prompts", type=int, default=16, help="distinct prompts cycled through in part 5")
    ap.add_argument("--load-warmup-s", type=float, default=4.0)
    ap.add_argument("--load-seconds", type=float, default=12.0, help="measured window per load level and mode")
    ap.add_argument("--load-gateway", choices=["adaptive", "adaptive-sequential", "pipelined", "sequential",
                                               "direct-adaptive", "direct-pipelined", "direct-sequential"],
                    default="adaptive", help="part 5 speculation: adaptive k with/without pipelining (without "
                    "suits draft and target on one GPU), or fixed k with/without pipelining")
    ap.add_argument("--time-budget-s", type=float, default=480.0,
                    help="part 5 skips the load levels that would end past this many seconds from the start")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--target-kv-gib", type=float, default=None, help="default: 16 on cuda, 0.25 on cpu")
    ap.add_argument("--draft-kv-gib", type=float, default=None, help="default: 4 on cuda, 0.25 on cpu")
    ap.add_argument("--max-batch", type=int, default=64, help="sessions per batched step in each tier")
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs in the tiers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--startup-timeout", type=float, default=900.0)
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args()
    try:
        check_max_branches(a.max_branches)
    except ValueError as e:
        ap.error(str(e))
    a.dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")
    gpu = a.device == "cuda"
    a.target_kv_gib = a.target_kv_gib or (16.0 if gpu else 0.25)
    a.draft_kv_gib = a.draft_kv_gib or (4.0 if gpu else 0.25)
    if a.load_alpha is None:
        a.load_alpha = 0.8 if 0.8 in a.alphas else max(a.alphas)
    a.prompts = min(a.prompts, a.load_prompts)
    if not a.load_governor or set(a.load_governor) - {"auto", "on", "off"}:
        ap.error(f"--load-governor takes auto, on, off (comma-separated), not {','.join(a.load_governor)!r}")
    a.deadline = time.perf_counter() + a.time_budget_s
    a.tiers = []  # started tier processes, stopped in main's `finally`
    return a


def save(res: dict) -> None:
    """Write the results so far (after each part and load level, so a cut-off run keeps them)."""
    Path(res["files"]["json"]).write_text(json.dumps(res, indent=2))


def on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # through main's `finally`: tiers stopped, results written


def start_tiers(a: argparse.Namespace, folder: Path, res: dict) -> tuple[Tier, Tier, Tier, dict[str, float]]:
    common = ["--shape", a.shape, "--dtype", a.dtype, "--seed", str(a.seed), "--max-model-len", str(a.max_model_len),
              "--max-batch", str(a.max_batch), "-k", str(a.k), "--ctx", str(a.prompt_len + a.max_tokens // 2)]
    if a.eager:
        common.append("--eager")
    if a.device == "cpu":
        common += ["--threads", "1", "--reps", "5"]
    tenv, tdev = device_env(f"cuda:{a.target_gpu}" if a.device == "cuda" else "cpu", a.target_tp)
    denv, ddev = device_env(f"cuda:{a.draft_gpu}" if a.device == "cuda" else "cpu")
    log(f"starting target ({a.shape}, GPU {tenv.get('CUDA_VISIBLE_DEVICES', 'none')}) and draft "
        f"(GPU {denv.get('CUDA_VISIBLE_DEVICES', 'none')}) tiers")
    target = Tier("target", ["target", *common, "--device", tdev, "--weights", a.target_weights,
                             "--kv-gib", str(a.target_kv_gib), "--tp", str(a.target_tp)], tenv)
    a.tiers.append(target)
    shared = a.device == "cpu" or a.target_gpu <= a.draft_gpu < a.target_gpu + a.target_tp
    if shared:  # each tier times its steps at start: one at a time, or each slows the other's timing
        target.wait_ready(a.startup_timeout)
    draft = Tier("draft", ["draft", *common, "--device", ddev, "--kv-gib", str(a.draft_kv_gib), "--method", a.method],
                 denv)
    a.tiers.append(draft)
    t_ready = target.ready if shared else target.wait_ready(a.startup_timeout)
    d_ready = draft.wait_ready(a.startup_timeout)
    timing = {**t_ready["timing"], **d_ready["timing"]}
    res.update(machine=f"target: {t_ready['device']}; draft: {d_ready['device']}", torch=t_ready["torch"],
               attention_backend=t_ready["attention"], tier_timings_ms=timing)
    log(f"tiers ready: {t_ready['device']} / {d_ready['device']}; step timings (ms) "
        + ", ".join(f"{k} {v:.2f}" for k, v in timing.items()))
    gws = Tier("gateways", ["gateways", "--folder", str(folder), "--target", f"127.0.0.1:{t_ready['port']}",
                            "--draft", f"127.0.0.1:{d_ready['port']}", "-k", str(a.k), "--max-model-len",
                            str(a.max_model_len), "--method", a.method, "--max-branches", str(a.max_branches),
                            *(["--head", str(a.head)] if a.head else [])],
               {**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    a.tiers.append(gws)
    gws.ports = gws.wait_ready(a.startup_timeout)["ports"]
    a.gws = gws
    return target, draft, gws, timing


def add_traces(res: dict) -> None:
    """With SPECSPLIT_TRACE set: each part 6 row gets the segments of its rounds, from the tiers' events."""
    folder = os.environ.get("SPECSPLIT_TRACE")
    if not folder or "part6" not in res:
        return
    events = trace_report.load(Path(folder))
    for r in res["part6"]["rows"]:
        if "trace_window_ns" in r:
            r["trace_segments"] = trace_report.segments(events, *r["trace_window_ns"], top=24)
            log(f"trace of part 6 {r['mode']} alpha {r['alpha']}:")
            trace_report.print_rows(r["trace_segments"])


def main() -> int:
    a = parse()
    signal.signal(signal.SIGTERM, on_sigterm)
    parts = set(a.parts.split(","))
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"benchmark": "gpu_services_bench", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "command": " ".join(sys.argv), "note": NOTE.format(shape=SHAPE_NOTE[a.shape]),
                           "shape": a.shape, "dtype": a.dtype, "target_weights": a.target_weights, "method": a.method,
                           "args": {k: v for k, v in vars(a).items() if k not in ("deadline", "tiers", "gws")},
                           "files": {"json": str(out / f"gpu_services_bench_{stamp}.json")}, "goals": {}}
    target_shape = bench_tiers.SHAPES[a.shape][0]
    rng = random.Random(a.seed)
    prompts = [[rng.randrange(target_shape["vocab_size"]) for _ in range(a.prompt_len)] for _ in range(a.load_prompts)]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = bench_tiers.write_model_folder(Path(tmp) / "model", target_shape)
            a.head = oracle_eagle.write_head_config(Path(tmp) / "head", target_shape) if a.method == "eagle3" else None
            target, draft, gws, timing = start_tiers(a, folder, res)
            asyncio.run(run_parts(a, parts, gws.ports, target, draft, prompts, timing, res))
    finally:
        for t in reversed(a.tiers):
            t.stop()  # the tiers write their trace events as they exit
        add_traces(res)
        res["files"]["plots"] = gpu_services_report.plot(res, out, stamp, log)
        save(res)
        if res["goals"]:
            gpu_services_report.print_tables(res)
        log(f"wrote {res['files']['json']}")
    return 0


async def run_parts(a: argparse.Namespace, parts: set[str], ports: dict[str, int], target: Tier, draft: Tier,
                    prompts: list[list[int]], timing: dict[str, float], res: dict) -> None:
    log(f"reference outputs: plain decoding of {len(prompts)} prompts x {a.max_tokens} tokens, all at once")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['plain']}") as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        runs = await asyncio.gather(*(generate(stub, p, i, a.max_tokens) for i, p in enumerate(prompts)))
    refs = [r.ids for r in runs]
    draft.call(refs=[[p, r] for p, r in zip(prompts, refs, strict=True)])
    draft.call(beta=a.beta[-1])
    draft.call(inline=a.draft_inline == "on")
    if "3" in parts:
        await part3(a, ports, draft, target, prompts, refs, timing, res)
    if "6" in parts:
        await part6(a, ports, draft, target, prompts, refs, timing, res)
    if "5" in parts:
        await part5(a, ports, draft, target, prompts, refs, res)


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    raise SystemExit(main())
