"""Real, local training text for EAGLE heads, and the target's states over it.

No dataset can be downloaded here, so the text is what the machine has: for a code model,
Python source of the standard library this interpreter ships; for a chat model, its own
answers to a fixed list of instructions (what the head will see it write when serving).
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from specsplit.runtime.runner import StepInput

# Instructions the chat target answers to make its own training data (none of the benchmarks' prompts).
SELF_PROMPTS = [
    "Explain what a hash table is.", "Write a short story about a lighthouse keeper.",
    "How do I reverse a string in Python?", "List three tips for better sleep.",
    "What is the difference between a list and a tuple?", "Describe the water cycle.",
    "Write a haiku about autumn.", "How does a binary search work?", "Give me a recipe for pancakes.",
    "What causes the seasons on Earth?", "Explain recursion to a beginner.", "Write a limerick about a cat.",
    "What is photosynthesis?", "How do I read a file line by line in Python?", "Summarise the plot of Hamlet.",
    "What are prime numbers?", "Explain the difference between TCP and UDP.", "Write a polite email declining a meeting.",
    "How do vaccines work?", "What is a closure in programming?", "Describe a sunset over the sea.",
    "How can I sort a dictionary by value in Python?", "What is machine learning?", "Give advice for a job interview.",
]


@dataclass
class Features:
    """One training sequence and the target's states over it (stored in bfloat16)."""

    tokens: Tensor  # [T] int64
    aux: Tensor | None  # [T, 3H] EAGLE-3: the three layers the head reads
    final: Tensor  # [T, H] final normed state (EAGLE-1 input, and the teacher's logits via the LM head)


def stdlib_files() -> list[Path]:
    """The standard library's own .py files, tests excluded, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "__pycache__")
    return sorted(p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts))


def stdlib_sequences(tokenizer: Any, seq_len: int, count: int) -> list[list[int]]:
    """`count` windows of `seq_len` tokens of standard-library source, spread over many files."""
    files = stdlib_files()
    if not files:
        raise ValueError("no standard library sources found to train on")
    out: list[list[int]] = []
    stride = max(1, len(files) // max(count, 1))
    for p in files[::stride]:
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) >= seq_len:
            start = min(len(ids) - seq_len, len(ids) // 4)  # past the licence headers
            out.append(ids[start : start + seq_len])
        if len(out) == count:
            break
    return out


def self_sequences(llm_engine: Any, tokenizer: Any, seq_len: int, count: int) -> list[list[int]]:
    """The target's own greedy answers (chat template + answer), one per instruction."""
    from specsplit.sampling.params import SamplingParams

    prompts = (SELF_PROMPTS * (count // len(SELF_PROMPTS) + 1))[:count]
    sp = [SamplingParams(temperature=0.0 if i < len(SELF_PROMPTS) else 0.7, seed=i, max_tokens=seq_len, ignore_eos=False)
          for i in range(count)]
    for i, (p, s) in enumerate(zip(prompts, sp, strict=True)):
        text = tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) \
            if getattr(tokenizer, "chat_template", None) else p
        llm_engine.add_request(f"train-{i}", text, tokenizer.encode(text, add_special_tokens=False), s)
    done: dict[str, list[int]] = {}
    while llm_engine.has_unfinished():
        for o in llm_engine.step():
            done[o.request_id] = (o.prompt_token_ids + o.outputs[0].token_ids)[:seq_len]
    return [done[f"train-{i}"] for i in range(count)]


def target_features(runner: Any, sequences: list[list[int]], aux_layers: tuple[int, ...] | None,
                    progress: Any = None) -> Iterator[Features]:
    """Run the target over each sequence once; keep the states the head trains on."""
    n = runner.cfg.num_layers
    layers = (*aux_layers, n) if aux_layers else (n,)
    for i, seq in enumerate(sequences):
        sid = -1 - i
        runner.add(sid)
        try:
            _, hidden = runner.forward_hidden([StepInput(sid, list(seq), 1, len(seq))], layers)  # [T, D]
        finally:
            runner.free(sid)
        h = runner.cfg.hidden_size
        yield Features(torch.tensor(seq), hidden[:, : 3 * h].bfloat16() if aux_layers else None,
                       hidden[:, -h:].bfloat16())
        if progress is not None:
            progress.update(len(seq))
