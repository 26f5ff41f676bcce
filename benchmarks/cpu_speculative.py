"""CPU benchmark of the core engine with the real Qwen2.5-Coder pair (1.5B target, 0.5B draft).

In one run, on the same prompts and greedy settings (fp32, 128 new tokens):
  1. our plain decoding (the baseline)     2. our speculation, draft_model
  3. our speculation, ngram                4. Hugging Face `generate`
  5. Hugging Face assisted generation (`assistant_model`)
  6. our speculation, eagle / eagle3 with a head trained by `specsplit eagle train` (--eagle3 DIR,
     --eagle DIR); the trainer's text (standard-library source) holds none of these prompts
Reports tokens/s, acceptance rate and mean accepted length as a table, a JSON file under
benchmarks/results/ and a bar plot. Every speculative output is checked token-identical to
our plain output (and ours to Hugging Face's), so a speed-up never hides a wrong answer.

    python benchmarks/cpu_speculative.py [--max-tokens 128] [--prompts 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = [
    "Write a Python function to calculate fibonacci numbers with memoization.",
    "Write a Python function that checks whether a string is a palindrome, ignoring case and punctuation.",
    "Write a Python class for a stack with push, pop, peek and is_empty methods.",
    "Write a Python function that merges two sorted lists into one sorted list.",
    "Write a Python function to compute the factorial of n iteratively and recursively.",
]
TARGET, DRAFT = "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def chat_ids(tok, prompt: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


def run_ours(name: str, target: str, spec: dict | None, prompts: list[list[int]], max_tokens: int) -> dict:
    from specsplit import LLM, SamplingParams

    log(f"{name}: loading")
    llm = LLM(target, speculative_config=spec, max_model_len=4096)
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    llm.generate([{"prompt_token_ids": prompts[0][:32]}], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    outs, secs = [], 0.0
    drafted = accepted = rounds = emitted = 0
    for i, ids in enumerate(prompts):
        t0 = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)[0].outputs[0]
        dt = time.perf_counter() - t0
        secs += dt
        m = out.metrics
        drafted, accepted = drafted + m.num_drafted_tokens, accepted + m.num_accepted_tokens
        rounds, emitted = rounds + m.num_rounds, emitted + m.num_emitted_tokens
        outs.append(out.token_ids)
        log(f"{name}: prompt {i + 1}/{len(prompts)}: {len(out.token_ids)} tokens in {dt:.1f}s "
            f"({len(out.token_ids) / dt:.2f} tok/s), acceptance {m.acceptance_rate:.2f}, "
            f"{m.mean_accepted_length:.2f} tok/round")
    del llm
    gc.collect()
    n = sum(len(o) for o in outs)
    return {"name": name, "tokens": n, "seconds": secs, "tok_s": n / secs, "outputs": outs,
            "acceptance_rate": accepted / drafted if drafted else None,
            "mean_accepted_length": emitted / rounds if rounds else None}


def run_hf(name: str, prompts: list[list[int]], max_tokens: int, assisted: bool) -> dict:
    from transformers import AutoModelForCausalLM

    from specsplit.factory import model_folder

    log(f"{name}: loading")
    model = AutoModelForCausalLM.from_pretrained(model_folder(TARGET), dtype=torch.float32).eval()
    kw = {}
    if assisted:
        kw["assistant_model"] = AutoModelForCausalLM.from_pretrained(model_folder(DRAFT), dtype=torch.float32).eval()
    outs, secs = [], 0.0
    with torch.inference_mode():
        model.generate(torch.tensor([prompts[0][:32]]), max_new_tokens=4, do_sample=False, **kw)
        for i, ids in enumerate(prompts):
            t0 = time.perf_counter()
            gen = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, **kw)
            dt = time.perf_counter() - t0
            secs += dt
            out = gen[0, len(ids):].tolist()
            outs.append(out)
            log(f"{name}: prompt {i + 1}/{len(prompts)}: {len(out)} tokens in {dt:.1f}s ({len(out) / dt:.2f} tok/s)")
    del model, kw
    gc.collect()
    n = sum(len(o) for o in outs)
    return {"name": name, "tokens": n, "seconds": secs, "tok_s": n / secs, "outputs": outs,
            "acceptance_rate": None, "mean_accepted_length": None}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    names = [r["name"] for r in rows]
    vals = [r["tok_s"] for r in rows]
    colors = ["#888" if r["name"].startswith("HF") else "#2a7" for r in rows]
    ax.barh(names[::-1], vals[::-1], color=colors[::-1])
    for y, v in enumerate(vals[::-1]):
        ax.text(v, y, f" {v:.2f}", va="center")
    ax.set_xlabel("tokens / s (greedy, fp32, 2-core CPU)")
    ax.set_title("Qwen2.5-Coder-1.5B target, 0.5B draft")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("-k", type=int, default=5, help="num_speculative_tokens (k_max with adaptive k)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--eagle3", help="EAGLE-3 head folder (specsplit eagle train qwen2.5-coder-1.5b)")
    ap.add_argument("--eagle", help="EAGLE-1 head folder (specsplit eagle train ... --method eagle)")
    args = ap.parse_args()
    from specsplit.factory import load_tokenizer, model_folder

    target = str(model_folder(TARGET))
    draft = str(model_folder(DRAFT))
    tok = load_tokenizer(Path(target))
    prompts = [chat_ids(tok, p) for p in PROMPTS[: args.prompts]]
    rows = [
        run_ours("ours plain", target, None, prompts, args.max_tokens),
        run_ours("ours draft_model", target, {"method": "draft_model", "model": draft,
                                              "num_speculative_tokens": args.k}, prompts, args.max_tokens),
        run_ours("ours ngram", target, {"method": "ngram", "num_speculative_tokens": args.k}, prompts,
                 args.max_tokens),
    ]
    for method in ("eagle", "eagle3"):
        head = getattr(args, method)
        if head:
            rows.append(run_ours(f"ours {method}", target, {"method": method, "model": head,
                                                           "num_speculative_tokens": args.k}, prompts, args.max_tokens))
    if not args.skip_hf:
        rows += [run_hf("HF generate", prompts, args.max_tokens, False),
                 run_hf("HF assisted", prompts, args.max_tokens, True)]
    base = rows[0]
    for r in rows:
        r["identical_to_plain"] = r["outputs"] == base["outputs"]
        r["speedup_vs_plain"] = r["tok_s"] / base["tok_s"]
    by = {r["name"]: r for r in rows}
    goals = {}
    if "HF assisted" in by:
        ratio = by["ours draft_model"]["tok_s"] / by["HF assisted"]["tok_s"]
        goals["draft_model_vs_hf_assisted"] = {"value": ratio, "goal": ">= 1.2", "met": ratio >= 1.2}
    goals["draft_model_vs_ours_plain"] = {"value": by["ours draft_model"]["speedup_vs_plain"], "goal": "> 1.0",
                                          "met": by["ours draft_model"]["speedup_vs_plain"] > 1.0}
    for method in ("eagle", "eagle3"):
        if f"ours {method}" in by:
            sp = by[f"ours {method}"]["speedup_vs_plain"]
            goals[f"{method}_vs_draft_model"] = {"value": sp / by["ours draft_model"]["speedup_vs_plain"],
                                                 "goal": ">= 1.0", "met": sp >= by["ours draft_model"]["speedup_vs_plain"]}
    print("\n| run | tok/s | vs ours plain | acceptance | tokens/round | identical to plain |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        acc = "" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
        mal = "" if r["mean_accepted_length"] is None else f"{r['mean_accepted_length']:.2f}"
        print(f"| {r['name']} | {r['tok_s']:.2f} | {r['speedup_vs_plain']:.2f}x | {acc} | {mal} | "
              f"{'yes' if r['identical_to_plain'] else 'NO'} |")
    for k, g in goals.items():
        print(f"{k}: {g['value']:.2f} (goal {g['goal']}: {'met' if g['met'] else 'NOT met'})")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"cpu_speculative_{stamp}.json"
    record = {"benchmark": "cpu_speculative", "date": stamp, "machine": f"{platform.machine()} "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}", "command": " ".join(sys.argv),
              "max_tokens": args.max_tokens, "prompts": PROMPTS[: args.prompts], "goals": goals,
              "rows": [{k: v for k, v in r.items() if k != "outputs"} for r in rows]}
    out.write_text(json.dumps(record, indent=2))
    plot(rows, RESULTS / "cpu_speculative.png")
    log(f"wrote {out} and {RESULTS / 'cpu_speculative.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
