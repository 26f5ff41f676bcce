"""Measure alpha and beta for the real Qwen2.5-Coder pair (1.5B target, 0.5B draft) on CPU.

alpha: how often the draft's top-1 is the target's greedy token (the per-token acceptance of a
greedy draft). beta: when the draft's top-1 is wrong, how often its top-2 is the target's token.
The tree of guesses (docs/architecture.md, "The tree of guesses") has the next block ready when the
verify accepts j of k tokens and the target's own token is the draft's guess for that outcome:
top-1 after a fully accepted block, top-2 at the first rejected position otherwise, so

    hit(today) = alpha^(k+1)        hit(tree) = alpha^(k+1) + beta * (1 - alpha^k).

Both are also counted directly on the decoded text (every start position, blocks of k), which
keeps whatever correlation between positions the formula ignores.

The target decodes each prompt greedily (fp32, our engine); the draft then reads prompt +
continuation in one forward and its top-2 at every generated position is compared with the
target's token. Models come from the project's catalogue (`specsplit models pull`), cached.

    python benchmarks/measure_beta.py [--prompts 6] [--max-tokens 96]
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
from cpu_speculative import DRAFT, RESULTS, TARGET, chat_ids, log  # noqa: E402 - benchmarks/ is on the path

PROMPTS = [
    "Write a Python function to calculate fibonacci numbers with memoization.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Write a Python class for a stack with push, pop and peek.",
    "Write a Python function that merges two sorted lists.",
    "Write a Python function that counts the words in a text file.",
    "Write a Python function that flattens a nested list.",
]




def greedy_decode(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """The target's own greedy continuations, all prompts in one batch: a CPU step is bound by
    reading the weights, so six sequences cost about what one does."""
    from specsplit import LLM, SamplingParams

    llm = LLM(TARGET, max_model_len=1024, kv_cache_memory_bytes=1 << 28)
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    t0 = time.perf_counter()
    outs = [list(o.outputs[0].token_ids) for o in llm.generate([{"prompt_token_ids": ids} for ids in prompts], sp,
                                                                 use_tqdm=True)]
    log(f"target decoded {sum(map(len, outs))} tokens ({len(prompts)} prompts) in {time.perf_counter() - t0:.0f}s")
    del llm
    gc.collect()
    return outs


def draft_top2(runner, seq_id: int, prompt: list[int], cont: list[int]) -> list[tuple[int, int]]:
    """The draft's (top-1, top-2) at each position of `cont`, given everything before it."""
    from specsplit.runtime.runner import StepInput

    runner.add(seq_id)
    try:
        ids = prompt + cont[:-1]
        logits = runner.forward([StepInput(seq_id, ids, num_logits=len(cont))])  # [len(cont), V]
        top = logits.topk(2, dim=-1).indices.tolist()
        return [(a, b) for a, b in top]
    finally:
        runner.free(seq_id)


def hit_rates(cont: list[int], top: list[tuple[int, int]], k: int) -> tuple[int, int, int]:
    """(blocks, today's hits, tree hits) over every start position of a block of k greedy drafts."""
    blocks = today = tree = 0
    for s in range(len(cont) - k):
        blocks += 1
        j = next((i for i in range(k) if top[s + i][0] != cont[s + i]), k)
        if j == k:
            if top[s + k][0] == cont[s + k]:
                today += 1
                tree += 1
        elif top[s + j][1] == cont[s + j]:
            tree += 1
    return blocks, today, tree


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from specsplit.factory import load_runner, load_tokenizer, model_folder

    t_start = time.perf_counter()
    tok = load_tokenizer(model_folder(TARGET))
    prompts = [chat_ids(tok, p) for p in PROMPTS[: args.prompts]]
    log(f"loading target {TARGET}; {len(prompts)} prompts x {args.max_tokens} tokens, decoded as one batch")
    conts = greedy_decode(prompts, args.max_tokens)
    log(f"loading draft {DRAFT} to read its top-2")
    draft, _ = load_runner(DRAFT, max_model_len=1024, kv_cache_bytes=1 << 28)
    tops = []
    for i, (ids, cont) in enumerate(zip(prompts, conts, strict=True)):
        tops.append(draft_top2(draft, i + 1, ids, cont))
        log(f"prompt {i + 1}/{len(prompts)}: draft read {len(cont)} positions")
    n = sum(len(c) for c in conts)
    top1 = sum(t[0] == c for cont, top in zip(conts, tops, strict=True) for c, t in zip(cont, top, strict=True))
    top2 = sum(t[0] != c and t[1] == c for cont, top in zip(conts, tops, strict=True)
               for c, t in zip(cont, top, strict=True))
    alpha = top1 / n
    beta = top2 / max(1, n - top1)
    by_k = {}
    for k in (3, 4, 5):
        counts = [hit_rates(c, t, k) for c, t in zip(conts, tops, strict=True)]
        blocks, today, tree = (sum(x[i] for x in counts) for i in range(3))
        by_k[str(k)] = {
            "hit_today_formula": alpha ** (k + 1),
            "hit_tree_formula": alpha ** (k + 1) + beta * (1 - alpha**k),
            "hit_today_counted": today / max(1, blocks),
            "hit_tree_counted": tree / max(1, blocks),
            "blocks_counted": blocks,
        }
    report = {
        "target": TARGET, "draft": DRAFT, "dtype": "float32", "device": "cpu", "greedy": True,
        "prompts": PROMPTS[: args.prompts], "tokens": n, "alpha": alpha, "beta": beta,
        "top1_hits": top1, "top2_hits_given_top1_miss": top2, "by_k": by_k,
        "seconds": time.perf_counter() - t_start, "host": platform.node(), "threads": args.threads,
        "command": "python benchmarks/measure_beta.py " + " ".join(sys.argv[1:]),
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"measure_beta_{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"alpha (top-1 agreement) {alpha:.3f} over {n} tokens; beta (top-2 | top-1 miss) {beta:.3f} "
          f"({top2} of {n - top1})")
    for k, r in by_k.items():
        print(f"k={k}: hit today {r['hit_today_formula']:.3f} (counted {r['hit_today_counted']:.3f}), "
              f"tree {r['hit_tree_formula']:.3f} (counted {r['hit_tree_counted']:.3f})")
    print(f"wrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
