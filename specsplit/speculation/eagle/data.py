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

# Coding requests a code target answers for `--data mix` (none is, or is close to, a benchmark prompt).
CODE_PROMPTS = [
    "Write a Python function that returns the n-th prime number.",
    "Write a Python function to flatten an arbitrarily nested list.",
    "Write a Python class for a circular buffer with a fixed capacity.",
    "Write a Python function that counts the words in a text file.",
    "Write a Python function to check whether a binary tree is balanced.",
    "Write a Python function that converts a Roman numeral to an integer.",
    "Write a Python function that finds the longest common prefix of a list of strings.",
    "Write a Python generator that yields the lines of a CSV file as dictionaries.",
    "Write a Python function to rotate a matrix by 90 degrees.",
    "Write a Python class for an LRU cache with get and put methods.",
    "Write a Python function that validates an email address with a regular expression.",
    "Write a Python function to compute the greatest common divisor of two numbers.",
    "Write a Python function that performs a breadth-first search on a graph.",
    "Write a Python function that removes duplicates from a list while keeping the order.",
    "Write a Python function to parse a query string into a dictionary.",
    "Write a Python decorator that retries a function three times on an exception.",
    "Write a Python function that computes the moving average of a list of numbers.",
    "Write a Python class for a bank account with deposit, withdraw and balance methods.",
    "Write a Python function that transposes a list of lists.",
    "Write a Python function to find all anagrams of a word in a list of words.",
    "Write a Python function that implements quicksort.",
    "Write a Python function to convert a temperature between Celsius and Fahrenheit.",
    "Write a Python context manager that times the block it wraps.",
    "Write a Python function that reads a JSON file and returns the keys of its top-level object.",
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
    for p in files[::stride] + [f for i, f in enumerate(files) if i % stride]:  # spread first, then the rest
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


def self_sequences(llm_engine: Any, tokenizer: Any, seq_len: int, count: int,
                   instructions: list[str] = SELF_PROMPTS, progress: Any = None) -> list[list[int]]:
    """The target's own answers (chat template + answer, at most `seq_len` new tokens), one per
    instruction: greedy on the first pass over `instructions`, sampled (T = 0.7) after."""
    from specsplit.sampling.params import SamplingParams

    prompts = (instructions * (count // len(instructions) + 1))[:count]
    sp = [SamplingParams(temperature=0.0 if i < len(instructions) else 0.7, seed=i, max_tokens=seq_len, ignore_eos=False)
          for i in range(count)]
    for i, (p, s) in enumerate(zip(prompts, sp, strict=True)):
        text = tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) \
            if getattr(tokenizer, "chat_template", None) else p
        llm_engine.add_request(f"train-{i}", text, tokenizer.encode(text, add_special_tokens=False), s)
    done: dict[str, list[int]] = {}
    while llm_engine.has_unfinished():
        for o in llm_engine.step():
            done[o.request_id] = o.prompt_token_ids + o.outputs[0].token_ids
        if progress is not None:  # rounds of the batch: one new token per unfinished answer
            progress.update(1)
    return [done[f"train-{i}"] for i in range(count)]


def pack(sequences: list[list[int]], seq_len: int) -> list[list[int]]:
    """Cut the concatenated sequences into windows of exactly `seq_len` tokens (a batch needs equal
    lengths; answers end at EOS anywhere); the last window ends at the last token. A text shorter
    than one window comes back whole."""
    stream = [t for s in sequences for t in s]
    if len(stream) <= seq_len:
        return [stream] if stream else []
    out = [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
    if len(stream) % seq_len:
        out.append(stream[-seq_len:])
    return out


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
