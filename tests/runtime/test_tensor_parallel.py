"""Tensor parallel on CPU (gloo): TP = 2 logits equal one device's; shutdown leaves in order,
within its bound, even when a worker never answers; SIGTERM ends a TP target tier cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from specsplit.runtime.runner import ModelRunner, StepInput
from specsplit.runtime.tensor_parallel import TensorParallelRunner
from tests.conftest import KV_BYTES


@pytest.fixture(scope="module")
def one(tiny_target: Path) -> ModelRunner:
    return ModelRunner.from_folder(tiny_target, kv_cache_bytes=KV_BYTES)


@pytest.fixture(scope="module")
def tp2(tiny_target: Path) -> Iterator[TensorParallelRunner]:
    r = TensorParallelRunner(tiny_target, 2, device_type="cpu", kv_cache_bytes=KV_BYTES,
                             on_worker_death=lambda rank, code: None)
    yield r
    r.shutdown()


def _same(tp: TensorParallelRunner, one: ModelRunner, inputs: list[StepInput]) -> None:
    a, b = tp.forward(inputs), one.forward(inputs)
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_tp2_logits_equal_one_device_through_prefill_verify_rollback_and_decode(
        tp2: TensorParallelRunner, one: ModelRunner) -> None:
    for r in (tp2, one):
        r.add(10)
        r.add(11)
    _same(tp2, one, [StepInput(10, list(range(5, 45))), StepInput(11, list(range(100, 117)), 3)])
    _same(tp2, one, [StepInput(10, [7, 8, 9, 10], 4), StepInput(11, [1, 2], 2)])  # verify blocks
    for r in (tp2, one):
        r.truncate(10, 42)  # two of four rejected
    _same(tp2, one, [StepInput(10, [60])])
    _same(tp2, one, [StepInput(10, [61]), StepInput(11, [62])])
    assert tp2.length(10) == one.length(10) == 44
    for r in (tp2, one):
        r.free(10)
        r.free(11)


def test_tp2_forks_and_renames_mirror_one_device(tp2: TensorParallelRunner, one: ModelRunner) -> None:
    """Branches of the tree of guesses on a TP draft: every rank forks the same blocks, so a
    branch's steps (on shared full blocks and a copied partial one) equal one device's."""
    for r in (tp2, one):
        r.add(20)
    _same(tp2, one, [StepInput(20, list(range(3, 40)))])  # 37 tokens: full blocks and a partial one
    made = [r.fork([(20, 21, 37), (20, 22, 33)]) for r in (tp2, one)]
    assert made[0] == made[1] == [21, 22]
    _same(tp2, one, [StepInput(21, [50, 51]), StepInput(22, [52]), StepInput(20, [53])])
    for r in (tp2, one):
        r.free(20)
        r.rename(21, 20)  # the branch that happened becomes the session
        r.free(22)
    _same(tp2, one, [StepInput(20, [54])])
    assert tp2.length(20) == one.length(20) == 40
    assert len(tp2.cache.seqs[20].blocks) == len(one.cache.seqs[20].blocks)  # (a shard's pool holds more blocks)
    for r in (tp2, one):
        r.free(20)


def test_bad_step_is_refused_on_rank0_and_the_group_keeps_working(tp2: TensorParallelRunner, one: ModelRunner) -> None:
    with pytest.raises(ValueError, match="no cache"):
        tp2.forward([StepInput(999, [1])])
    for r in (tp2, one):
        r.add(12)
    _same(tp2, one, [StepInput(12, list(range(30)), 2)])
    for r in (tp2, one):
        r.free(12)


def test_all_reduce_timing_runs_on_every_rank(tp2: TensorParallelRunner) -> None:
    assert tp2.all_reduce_ms(4096, iters=8) > 0
    one = [StepInput(13, [1, 2, 3])]
    tp2.add(13)
    tp2.forward(one)  # the workers are still in step after the timing op
    tp2.free(13)


def test_shutdown_leaves_the_collectives_together_then_destroys_then_exits(tp2: TensorParallelRunner) -> None:
    t = time.monotonic()
    assert tp2.shutdown(timeout_s=10.0) is True
    assert time.monotonic() - t < 10.0
    assert [stage for stage, _ in tp2.teardown] == [
        "stop sent", "all ranks left the collectives", "process group destroyed", "workers exited [0]"]
    assert [p.exitcode for p in tp2.procs] == [0]
    assert not dist.is_initialized()
    assert not Path("/dev/shm", tp2.ring.shm.name.lstrip("/")).exists()


def test_speculative_greedy_over_a_tp2_target_is_token_identical_to_one_device(
        make_llm: Any, tiny_target: Path, tiny_draft: Path) -> None:
    from specsplit import LLM, SamplingParams

    prompts = ["def fibonacci(n):", "The quick brown", "import numpy as np"]
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ref = make_llm(tiny_target).generate(prompts, sp, use_tqdm=False)
    spec = {"method": "draft_model", "model": str(tiny_draft), "num_speculative_tokens": 4}
    with LLM(str(tiny_target), speculative_config=spec, tensor_parallel_size=2, kv_cache_memory_bytes=KV_BYTES) as llm:
        out = llm.generate(prompts, sp, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in ref]
    assert sum(o.metrics.num_accepted_tokens for o in out) > 0  # blocks were verified, some accepted


def test_shutdown_kills_a_worker_that_never_answers_within_the_bound(tiny_target: Path) -> None:
    r = TensorParallelRunner(tiny_target, 2, device_type="cpu", kv_cache_bytes=KV_BYTES,
                             on_worker_death=lambda rank, code: None)
    os.kill(r.procs[0].pid, signal.SIGSTOP)  # alive, but never reads another message
    t = time.monotonic()
    assert r.shutdown(timeout_s=3.0) is False
    took = time.monotonic() - t
    assert took < 3.0 + 0.5, f"shutdown took {took:.2f}s for a 3s bound"
    assert r.procs[0].exitcode == -signal.SIGKILL
    stages = [stage for stage, _ in r.teardown]
    assert stages[:3] == ["stop sent", "barrier timed out", "stragglers killed"]
    assert not dist.is_initialized()  # the group is gone: this process can start another


def _tp_workers(pid: int) -> list[int]:
    """Child processes of `pid` that run a spawned worker (not multiprocessing's resource tracker)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path("/proc", d, "stat").read_text()
                cmd = Path("/proc", d, "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmd:
                out.append(int(d))
    return out


def test_sigterm_to_a_tp2_target_tier_exits_0_within_10s(tiny_target: Path) -> None:
    from specsplit.launcher import free_port, wait_serving

    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "specsplit.cli", "target", str(tiny_target), "--tensor-parallel-size", "2",
         "--host", "127.0.0.1", "--grpc-port", str(port), "--metrics-port", "0", "--kv-cache-memory-bytes",
         str(KV_BYTES)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_serving(f"127.0.0.1:{port}", [proc], timeout_s=300)  # serving = warm-up step done on both ranks
        workers = _tp_workers(proc.pid)
        assert workers, "no tensor-parallel worker process"
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        took = time.monotonic() - t
    finally:
        if proc.poll() is None:
            proc.kill()
        log = proc.communicate()[0]
    assert rc == 0, log[-3000:]
    assert took < 10.0, f"exit took {took:.1f}s\n{log[-3000:]}"
    assert "clean shutdown" in log, log[-3000:]
    time.sleep(0.5)
    assert not any(Path("/proc", str(w)).exists() for w in workers), "a worker outlived its tier"
