"""The tiers of gpu_services_bench.py, each its own process, on random-weight models of real shapes.

    python benchmarks/bench_tiers.py target   --shape llama8b --device cuda:0
    python benchmarks/bench_tiers.py draft    --shape llama8b --device cuda:0 --seed 0
    python benchmarks/bench_tiers.py gateways --folder DIR --target HOST:PORT --draft HOST:PORT -k 5

Each serves the real service code (`start_target`, `start_draft`, `start_gateway`) on
127.0.0.1, then prints one JSON line on stdout ({"ready": ...}: ports, step timings); after
that it reads JSON commands from stdin, one per line, and answers each with one JSON line.
EOF on stdin stops it. All other output goes to stderr.

The target has `confident_random_model` weights (see benchmarks/oracle.py: its greedy
continuation cannot flip on rounding), the draft random weights and the benchmark-only
`OracleDrafter`, whose acceptance rate the parent sets with {"alpha": a}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # specsplit without an install
from specsplit.runtime.random_weights import LLAMA_31_8B, LLAMA_32_1B  # noqa: E402

TINY_TARGET = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=4096)
TINY_DRAFT = dict(TINY_TARGET, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1)
SHAPES: dict[str, tuple[dict, dict]] = {"llama8b": (LLAMA_31_8B, LLAMA_32_1B), "tiny": (TINY_TARGET, TINY_DRAFT)}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class Channel:
    """JSON lines to the parent on the real stdout; anything else printed goes to stderr."""

    def __init__(self) -> None:
        self._out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr

    def send(self, obj: dict[str, Any]) -> None:
        self._out.write(json.dumps(obj) + "\n")
        self._out.flush()

    async def commands(self) -> AsyncIterator[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            if line.strip():
                yield json.loads(line)


def greedy() -> Any:
    from specsplit.sampling.params import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=1)


def write_model_folder(folder: Path, shape: dict) -> Path:
    """config.json + a word-level tokenizer with one entry per id: what the gateway loads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(**shape)
    cfg.save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(shape["vocab_size"])}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, int) else 0
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"t{eos}").save_pretrained(folder)
    return folder


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


IDLE_S = 0.007  # about a verify: how long each tier idles between its steps in a sequential round


def after_idle_ms(fn: Any, device: torch.device, reps: int, idle_s: float = IDLE_S) -> float:
    """Mean ms of `fn()` (which ends on a host sync) when the process idled `idle_s` before each
    call, as a tier does between the steps of a served round. Against the same call back to back,
    it shows what idling costs: slower wake-ups, lower clocks."""
    total = 0.0
    for _ in range(reps):
        _sync(device)
        time.sleep(idle_s)
        t = time.perf_counter()
        fn()
        total += time.perf_counter() - t
    return total / reps * 1000


def time_target(verifier: Any, ctx: int, k: int, reps: int) -> dict[str, float]:
    """Server-side ms of a 1-token step and a (k+1)-token verify at batch 1, context ~ctx."""
    from specsplit.speculation.target import VerifyItem

    v = verifier.vocab_size
    prompt = [(7 * i + 3) % v for i in range(ctx)]
    block = [(13 * i + 1) % v for i in range(k)]  # wrong drafts: the context grows by 1 per step
    out = {}
    for name, drafts in (("step1_ms", []), (f"verify{k + 1}_ms", block)):
        for sid in (-101, -102):  # the first pass captures the CUDA graphs the timed one replays
            verifier.open(sid, prompt, greedy())
            verifier.step([VerifyItem(sid, [])])
            _sync(verifier.runner.device)
            t = time.perf_counter()
            for _ in range(reps):
                verifier.step([VerifyItem(sid, list(drafts))])
            dt = (time.perf_counter() - t) / reps * 1000
            if sid == -102:
                out[name.replace("_ms", "_after_idle_ms")] = after_idle_ms(
                    lambda d=drafts, s=sid: verifier.step([VerifyItem(s, list(d))]), verifier.runner.device, reps)
            verifier.close(sid)
        out[name] = dt
    # the same runner's bare step (forward + argmax to the host), as gpu_bench times the engine
    from specsplit.runtime.runner import StepInput

    runner = verifier.runner
    runner.add(-103)
    tok = int(runner.forward([StepInput(-103, prompt)]).argmax(-1)[0])
    for _pass in ("capture", "timed"):
        runner.truncate(-103, ctx)
        _sync(runner.device)
        t = time.perf_counter()
        for _ in range(reps):
            tok = runner.forward([StepInput(-103, [tok])]).argmax(-1).tolist()[0]
        dt = (time.perf_counter() - t) / reps * 1000
    runner.free(-103)
    out["engine_step_ms"] = dt
    return out


def inprocess_plain(verifier: Any, prompt_len: int, max_tokens: int, passes: int = 3) -> dict[str, float]:
    """The baseline of every speed claim: our engine decoding plainly, in this process, on this GPU.

    `SpecEngine` without a drafter (what `LLM(...)` runs), greedy, batch 1; the best of `passes`
    (the first also captures the CUDA graphs of the context buckets on the way).
    """
    from specsplit.sampling.params import SamplingParams
    from specsplit.speculation.engine import SpecEngine

    v = verifier.vocab_size
    engine = SpecEngine(verifier, None, None, max_num_seqs=1)
    best = float("inf")
    for i in range(passes):
        engine.add_request(f"plain-{i}", None, [(11 * j + 5) % v for j in range(prompt_len)],
                           SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        out = []
        _sync(verifier.runner.device)
        t = time.perf_counter()
        while engine.has_unfinished():
            out += engine.step()
        dt = time.perf_counter() - t
        n = len(out[0].outputs[0].token_ids)
        best = min(best, dt / n * 1000)
    return {"inprocess_plain_ms_per_token": best, "inprocess_plain_tok_s": 1000 / best}


def time_draft(drafter: Any, ctx: int, k: int, reps: int) -> dict[str, float]:
    """Server-side ms of proposing k tokens at batch 1 (k forwards), context ~ctx."""
    from specsplit.speculation.drafters import DraftRequest

    v = drafter.vocab_size
    drafter.open(-101, [(7 * i + 3) % v for i in range(ctx)], greedy())
    req = [DraftRequest(-101, ctx, [], k)]  # same prefix each time: rolled back, k forwards
    for _ in range(3):
        drafter.propose(req)
    _sync(drafter.device)
    t = time.perf_counter()
    for _ in range(reps):
        drafter.propose(req)
    dt = (time.perf_counter() - t) / reps * 1000
    idle = after_idle_ms(lambda: drafter.propose(req), drafter.device, reps)
    drafter.close(-101)
    return {f"draft{k}_ms": dt, "draft_token_ms": dt / k, f"draft{k}_after_idle_ms": idle}


def tier_stats(handle: Any, runner: Any, since: dict[str, float] | None = None) -> dict[str, float]:
    """Batched steps of a tier (since an earlier snapshot): count, mean batch, mean step time, CUDA graphs."""
    reg = handle.metrics.registry
    graphs = getattr(runner, "graphs", None) or getattr(runner, "chain", None)  # an EAGLE head: its HeadChain
    raw = {"steps": reg.get_sample_value("specsplit_steps_total") or 0.0,
           "graphs": float(len(graphs.graphs)) if graphs is not None else 0.0,  # captured so far (max 256)
           "graph_replays": float(graphs.replays) if graphs is not None else 0.0,
           "batch_sum": reg.get_sample_value("specsplit_batch_size_sum") or 0.0,
           "seconds_sum": reg.get_sample_value("specsplit_step_seconds_sum") or 0.0,
           "gather_waits": float(handle.batcher.gather_waits), "gather_timeouts": float(handle.batcher.gather_timeouts)}
    d = {k: v - (since or {}).get(k, 0.0) for k, v in raw.items()}
    n = d["steps"]
    return {**raw, "steps_since": n, "graphs_captured_since": d["graphs"], "graph_replays_since": d["graph_replays"],
            "gather_waits_since": d["gather_waits"], "gather_timeouts_since": d["gather_timeouts"],
            "mean_batch": d["batch_sum"] / n if n else 0.0,
            "mean_step_ms": 1000 * d["seconds_sum"] / n if n else 0.0}


def _device_info(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"{platform.machine()} CPU, {os.cpu_count()} cores"


async def run_target(a: argparse.Namespace, ch: Channel) -> None:
    from oracle import confident_random_model

    from specsplit.runtime.random_weights import random_model
    from specsplit.runtime.runner import ModelRunner
    from specsplit.speculation.target import TargetVerifier
    from target_service.config import TargetServiceConfig
    from target_service.server import start_target

    dev, dtype = torch.device(a.device), DTYPES[a.dtype]
    shape = SHAPES[a.shape][0]
    t0 = time.perf_counter()
    kw = dict(max_model_len=a.max_model_len, kv_cache_bytes=int(a.kv_gib * 2**30), enforce_eager=a.eager)
    if a.tp > 1:  # ranks on the first a.tp visible devices, each builds its shard of the same model
        from specsplit.runtime.random_weights import RandomWeights
        from specsplit.runtime.tensor_parallel import TensorParallelRunner

        confident = a.weights == "confident"
        rw = RandomWeights(dict(shape, tie_word_embeddings=False) if confident else shape, seed=a.seed,
                           std=0.004 if confident else 0.02, confident=confident)
        runner: Any = TensorParallelRunner(None, a.tp, device_type=dev.type, random_weights=rw, dtype=dtype, **kw)
    else:
        if a.weights == "confident":
            cfg, model, _ = confident_random_model(shape, dev, dtype, seed=a.seed)
        else:
            cfg, model = random_model(shape, dev, dtype, seed=a.seed)
        runner = ModelRunner.from_model(cfg, model, device=dev, **kw)
    verifier = TargetVerifier(runner)
    timing = time_target(verifier, a.ctx, a.k, a.reps)
    timing.update(inprocess_plain(verifier, a.ctx, a.plain_tokens))
    print(f"[target] built in {time.perf_counter() - t0:.0f}s; {timing}", file=sys.stderr, flush=True)
    from specsplit.speculation.adaptive import CostModel

    costs = CostModel()  # the direct rounds' cost model: its load governor is watched and steered from here
    handle = await start_target(TargetServiceConfig(model="random", host="127.0.0.1", grpc_port=0, metrics_port=0,
                                                    max_batch=a.max_batch), verifier=verifier, costs=costs)
    ch.send({"ready": True, "port": handle.port, "device": _device_info(dev), "timing": timing,
             "torch": torch.__version__, "attention": getattr(runner, "backend", f"tensor-parallel x{a.tp}")})
    since: dict[str, float] = {}
    async for cmd in ch.commands():
        if "stats" in cmd:  # steps since the last {"stats": ...} call
            since = tier_stats(handle, runner, since)
            gov = costs.governor
            ch.send({**since, "governor_epochs_drafting": gov.epochs[True], "governor_epochs_plain": gov.epochs[False]})
        elif "governor" in cmd:  # auto (the default), on (always draft), off (never)
            costs.governor.fixed = {"auto": None, "on": True, "off": False}[cmd["governor"]]
            ch.send({"ok": True})
        elif "gather" in cmd:  # the batcher's step gathering (--step-gather), for A/B runs
            handle.batcher.gather = float(cmd["gather"])
            ch.send({"ok": True, "gather": handle.batcher.gather})
        else:
            ch.send({"error": f"unknown command {cmd}"})
    await handle.shutdown(2.0)
    if a.tp > 1:
        runner.shutdown()


async def run_draft(a: argparse.Namespace, ch: Channel) -> None:
    from dataclasses import asdict

    from oracle import OracleDrafter, OracleStats

    from draft_service.config import DraftServiceConfig
    from draft_service.server import start_draft
    from specsplit.config import SpeculativeConfig
    from specsplit.runtime.random_weights import random_model
    from specsplit.runtime.runner import ModelRunner

    dev, dtype = torch.device(a.device), DTYPES[a.dtype]
    if a.method == "eagle3":  # a real-size EAGLE-3 head behind the oracle (benchmarks/oracle_eagle.py)
        from oracle_eagle import random_eagle3_drafter, time_head

        drafter: Any = random_eagle3_drafter(SHAPES[a.shape][0], dev, dtype, max_model_len=a.max_model_len,
                                             kv_cache_bytes=int(a.kv_gib * 2**30), seed=a.seed)
        runner, model, time_draft_ = drafter.runner, drafter.runner.head, time_head
    else:
        cfg, model = random_model(SHAPES[a.shape][1], dev, dtype, seed=a.seed + 10)
        runner = ModelRunner.from_model(cfg, model, device=dev, max_model_len=a.max_model_len,
                                        kv_cache_bytes=int(a.kv_gib * 2**30), enforce_eager=a.eager)
        drafter, time_draft_ = OracleDrafter(runner, alpha=1.0, seed=a.seed), time_draft
    timing = time_draft_(drafter, a.ctx, a.k, a.reps)
    if dev.type == "cuda":  # bandwidth bound of one draft token: read every weight once
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        from gpu_bench import (
            copy_bandwidth,  # benchmarks/: the copy rate every bound here is measured with
        )

        timing["draft_bound_ms"] = weight_bytes / copy_bandwidth(dev) * 1000
        timing["draft_weight_gb"] = weight_bytes / 1e9
    timing.update({k: v for k, v in time_draft_(drafter, a.ctx, a.k + 1, a.reps).items() if k != "draft_token_ms"})
    print(f"[draft] {timing}", file=sys.stderr, flush=True)
    scfg = SpeculativeConfig(method=a.method, model="oracle (benchmark only)", num_speculative_tokens=a.k)
    handle = await start_draft(DraftServiceConfig(model="random", speculative=scfg, host="127.0.0.1", grpc_port=0,
                                                  metrics_port=0, max_batch=a.max_batch), drafter=drafter)
    ch.send({"ready": True, "port": handle.port, "device": _device_info(dev), "timing": timing})
    since: dict[str, float] = {}
    async for cmd in ch.commands():
        if "refs" in cmd:
            await handle.batcher.call(drafter.set_references, cmd["refs"])
            ch.send({"ok": True, "refs": len(drafter.refs)})
        elif "inline" in cmd:  # a lone session's step on the loop's thread (StepBatcher.inline_alone), for A/B runs
            handle.batcher.inline_alone = bool(cmd["inline"])
            ch.send({"ok": True, "inline": handle.batcher.inline_alone})
        elif "alpha" in cmd:
            await handle.batcher.call(drafter.set_alpha, float(cmd["alpha"]))
            ch.send({"ok": True, "alpha": drafter.alpha})
        elif "beta" in cmd:  # the oracle's runner-up, which the tree of guesses branches on
            await handle.batcher.call(drafter.set_beta, float(cmd["beta"]))
            ch.send({"ok": True, "beta": drafter.beta})
        elif "gather" in cmd:  # the batcher's step gathering (--step-gather), for A/B runs
            handle.batcher.gather = float(cmd["gather"])
            ch.send({"ok": True, "gather": handle.batcher.gather})
        elif "stats" in cmd:  # oracle counts since the last reset, draft steps since the last call
            since = tier_stats(handle, runner, since)
            ch.send({**asdict(drafter.stats), "draft_steps": since["steps_since"], "draft_mean_batch":
                     since["mean_batch"], "draft_mean_step_ms": since["mean_step_ms"],
                     "draft_graphs_captured": since["graphs_captured_since"]})
            if cmd.get("reset"):
                drafter.stats = OracleStats()
        else:
            ch.send({"error": f"unknown command {cmd}"})
    await handle.shutdown(2.0)


async def run_gateways(a: argparse.Namespace, ch: Channel) -> None:
    """Several gateways in one process (only one is driven at a time), all on the same tiers."""
    from gateway.config import GatewayConfig
    from gateway.server import start_gateway
    from specsplit.config import SpeculativeConfig

    def spec(adaptive: bool) -> SpeculativeConfig:  # eagle3: the gateway reads the head's config.json
        return SpeculativeConfig(method=a.method, model=a.head or "oracle (benchmark only)",
                                 num_speculative_tokens=a.k, adaptive=adaptive)

    modes = {"plain": (None, False), "sequential": (spec(False), False), "pipelined": (spec(False), True),
             "adaptive": (spec(True), True), "adaptive-sequential": (spec(True), False)}
    handles = {}
    for round_mode in ("gateway", "direct"):  # who drives the rounds (gateway/config.py)
        for name, (sc, pipe) in modes.items():
            cfg = GatewayConfig(model=a.folder, speculative=sc, host="127.0.0.1", port=0, grpc_port=0,
                                target_addresses=(a.target,), draft_addresses=(a.draft,) if sc else (),
                                pipeline=pipe, max_concurrent_requests=1024, round_mode=round_mode,
                                max_branches=a.max_branches)
            handles[name if round_mode == "gateway" else f"direct-{name}"] = \
                await start_gateway(cfg, max_model_len=a.max_model_len)
    ch.send({"ready": True, "ports": {n: h.port for n, h in handles.items()}})
    async for cmd in ch.commands():
        if "timeline" in cmd:  # round timing sums of one gateway since the last call, then reset
            core = handles[cmd["timeline"]].core
            ch.send(core.take_timeline())
        else:
            ch.send({"error": f"unknown command {cmd}"})
    for h in handles.values():
        await h.shutdown(2.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("role", choices=["target", "draft", "gateways"])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama8b")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--weights", choices=["confident", "random"], default="confident")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--kv-gib", type=float, default=8.0)
    ap.add_argument("--tp", type=int, default=1, help="target: tensor-parallel size (ranks on the visible GPUs)")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs")
    ap.add_argument("--ctx", type=int, default=192, help="context of the step timings")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--plain-tokens", type=int, default=128, help="target: tokens of the in-process plain baseline")
    ap.add_argument("--folder", help="gateways: model folder (config + tokenizer)")
    ap.add_argument("--target", help="gateways: target address")
    ap.add_argument("--draft", help="gateways: draft address")
    ap.add_argument("--method", choices=["draft_model", "eagle3"], default="draft_model",
                    help="draft, gateways: the oracle over a draft model or over a real-size EAGLE-3 head")
    ap.add_argument("--head", help="gateways, --method eagle3: folder with the head's config.json")
    ap.add_argument("--max-branches", type=int, default=0, help="gateways: the tree of guesses' width (0: all)")
    a = ap.parse_args()
    ch = Channel()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format=f"[{a.role}] %(levelname)s %(name)s: %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    run = {"target": run_target, "draft": run_draft, "gateways": run_gateways}[a.role]
    asyncio.run(run(a, ch))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
