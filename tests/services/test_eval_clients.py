"""The tools people evaluate and benchmark servers with, run against a real `specsplit up`.

- lm-evaluation-harness (`lm_eval --model local-completions`) scores a tiny multiple-choice
  task defined in `lm_eval_task/` (no dataset hub is reachable) by log-likelihood: batched
  token-id prompts, `echo` and `logprobs` on /v1/completions. Its numbers must equal the
  log-likelihoods transformers computes on the same weights.
- guidellm (vLLM's benchmark client) sends chat requests with content parts, streaming,
  `stream_options` with vLLM's `continuous_usage_stats`, and `ignore_eos`; every request of
  its run must succeed with the token count it asked for.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from specsplit.launcher import free_port
from tests.services.conftest import ROOT, TinyModels

TASK_DIR = Path(__file__).parent / "lm_eval_task"


@pytest.fixture(scope="module")
def up(models: TinyModels) -> Iterator[int]:
    """`specsplit up` on the tiny pair with draft-model speculation; yields its HTTP port."""
    port = free_port()
    spec = {"method": "draft_model", "model": str(models.draft), "num_speculative_tokens": 3, "adaptive": False}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("SPECSPLIT_MODEL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "specsplit.cli", "up", str(models.target), "--port", str(port),
         "--grpc-port", str(free_port()), "--speculative-config", json.dumps(spec)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True)  # its own process group: the tiers it starts end with it
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.stderr.read()[-3000:]  # type: ignore[union-attr]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "specsplit up did not start within 240 s"
            time.sleep(1)
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _hf_loglikelihood(model: Path, context: str, continuation: str) -> float:
    """lm-eval's split (whole string encoded, context tokens cut off) scored by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    ctx = tok(context, add_special_tokens=False).input_ids
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.inference_mode():
        lp = hf(torch.tensor([whole])).logits[0].double().log_softmax(-1)  # [L, V]
    return float(sum(lp[i - 1, whole[i]] for i in range(len(ctx), len(whole))))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_lm_eval_harness_scores_loglikelihood_through_specsplit_up(up: int, models: TinyModels,
                                                                   tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    exe = shutil.which("lm_eval")
    assert exe, "lm_eval is installed but its command is not on PATH"
    args = ",".join([f"model={models.target}", f"base_url=http://127.0.0.1:{up}/v1/completions",
                     f"tokenizer={models.target}", "tokenizer_backend=huggingface", "tokenized_requests=True",
                     "num_concurrent=1", "max_retries=1"])
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    run = subprocess.run(
        [exe, "--model", "local-completions", "--model_args", args, "--tasks", "specsplit_tiny",
         "--include_path", str(TASK_DIR), "--batch_size", "2", "--output_path", str(tmp_path / "out"),
         "--log_samples"],
        cwd=TASK_DIR, env=env, capture_output=True, text=True, timeout=540)  # the task's data path is relative
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    (samples,) = (tmp_path / "out").rglob("samples_specsplit_tiny_*.jsonl")
    scored = 0
    for line in samples.read_text().splitlines():
        s = json.loads(line)
        for i, resp in enumerate(s["resps"]):
            args_i = s["arguments"][f"gen_args_{i}"]
            got = float(resp[0][0])
            assert got == pytest.approx(_hf_loglikelihood(models.target, args_i["arg_0"], args_i["arg_1"]),
                                        abs=1e-3), args_i
            scored += 1
    assert scored == 7  # every choice of the three documents


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_guidellm_benchmark_run_succeeds_through_specsplit_up(up: int, tmp_path: Path) -> None:
    pytest.importorskip("guidellm")
    exe = shutil.which("guidellm")
    assert exe, "guidellm is installed but its command is not on PATH"
    run = subprocess.run(
        [exe, "run", "--backend", f"kind=openai_http,target=http://127.0.0.1:{up}",
         "--profile", "kind=synchronous", "--constraint", "kind=max_requests,count=4",
         "--data", "kind=synthetic_text,prompt_tokens=16,output_tokens=8", "--output", "kind=json",
         "--disable-console"],
        cwd=tmp_path, capture_output=True, text=True, timeout=540)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    report = json.loads((tmp_path / "benchmarks.json").read_text())
    (bench,) = report["benchmarks"]
    reqs = bench["requests"]
    assert reqs["errored"] == [] and reqs["incomplete"] == [], json.dumps(reqs["errored"][:1])[:2000]
    assert len(reqs["successful"]) >= 3
    assert all(r["output_metrics"]["text_tokens"] == 8 for r in reqs["successful"])
