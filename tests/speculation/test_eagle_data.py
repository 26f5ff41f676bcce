"""The trainer's text: equal-length windows (a batch stacks them), standard-library windows up to
the count asked for, `--data mix` (own answers to coding requests, then source), and coding
requests that are not the CPU benchmark's prompts (its prompts must be new to the head)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from specsplit.cli import main
from specsplit.speculation.eagle import data
from specsplit.speculation.eagle.data import CODE_PROMPTS, pack, stdlib_sequences
from specsplit.testing import make_tiny_model

ROOT = Path(__file__).resolve().parents[2]


def test_pack_cuts_equal_windows_and_keeps_every_token():
    seqs = [list(range(0, 7)), list(range(100, 103)), list(range(200, 211))]  # 21 tokens, EOS anywhere
    windows = pack(seqs, 8)
    stream = [t for s in seqs for t in s]
    assert [len(w) for w in windows] == [8, 8, 8]
    assert windows[0] == stream[:8] and windows[1] == stream[8:16]
    assert windows[-1] == stream[-8:]  # the remainder ends at the last token
    assert set(t for w in windows for t in w) == set(stream)


def test_pack_keeps_a_short_text_whole_and_an_empty_one_empty():
    assert pack([[1, 2], [3]], 8) == [[1, 2, 3]]
    assert pack([[1, 2, 3, 4]], 4) == [[1, 2, 3, 4]]
    assert pack([], 8) == []


class _CharTokenizer:
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]


def test_stdlib_windows_reach_the_count_when_the_spread_files_are_short(tmp_path, monkeypatch):
    files = []
    for i in range(10):  # files 0, 2, 4, 6, 8 (the first, spread pass for 5 windows): only two are long
        p = tmp_path / f"m{i}.py"
        p.write_text("x = 1\n" * (40 if i in (0, 4) or i % 2 else 1))
        files.append(p)
    monkeypatch.setattr(data, "stdlib_files", lambda: files)
    out = stdlib_sequences(_CharTokenizer(), 64, 5)
    assert len(out) == 5 and all(len(w) == 64 for w in out)


def test_code_prompts_are_not_the_cpu_benchmarks_prompts():
    spec = importlib.util.spec_from_file_location("cpu_speculative", ROOT / "benchmarks" / "cpu_speculative.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    topics = ("fibonacci", "palindrome", "stack", "merge", "factorial")  # the benchmark's tasks
    assert not set(CODE_PROMPTS) & set(bench.PROMPTS)
    assert not [p for p in CODE_PROMPTS if any(t in p.lower() for t in topics)]
    assert all(any(t in p.lower() for t in topics) for p in bench.PROMPTS)  # the list above is complete


def test_mix_trains_on_own_code_answers_then_stdlib(tmp_path):
    target = make_tiny_model(tmp_path / "tiny-coder", layers=8, init_std=0.5)
    out = tmp_path / "head"
    rc = main(["eagle", "train", str(target), "--out", str(out), "--data", "mix", "--sequences", "150",
               "--seq-len", "32", "--answer-tokens", "8", "--epochs", "1", "--batch", "2", "--draft-vocab", "128",
               "--intermediate-size", "64"])
    assert rc == 0
    meta = json.loads((out / "training.json").read_text())
    assert meta["data"] == "mix" and meta["sequences"] == 150 and meta["tokens"] == 150 * 32
    assert 0 < meta["own_answer_sequences"] < 150  # both parts: its answers first, then source


def test_config_refuses_unknown_data_and_empty_answers():
    from specsplit.speculation.eagle.train import TrainConfig

    with pytest.raises(ValueError, match="--data"):
        TrainConfig(data="web")
    with pytest.raises(ValueError, match="answer_tokens"):
        TrainConfig(answer_tokens=0)
