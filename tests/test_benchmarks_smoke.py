"""The GPU services benchmark runs end to end on CPU with tiny shapes, so a change to the
services or the oracle cannot break it silently before the next GPU run (its eagle3 variant once
failed at start with no test noticing). Not a measurement: the numbers here mean nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "gpu_services_bench.py"
SMOKE = ["--shape", "tiny", "--device", "cpu", "--parts", "6", "--modes", "direct-pipelined", "--alphas", "0.8",
         "--prompts", "2", "--load-prompts", "2", "--repeats", "1", "--max-tokens", "32"]


def _bench(args: list[str], out: Path, timeout_s: float = 400.0, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(BENCH), *args, "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout_s)


def _result(out: Path) -> dict:
    (path,) = out.glob("gpu_services_bench_*.json")
    return json.loads(path.read_text())


@pytest.mark.slow
@pytest.mark.timeout(480)
@pytest.mark.parametrize("method", ["draft_model", "eagle3"])
def test_gpu_services_bench_part6_runs_on_cpu_and_stays_lossless(tmp_path: Path, method: str) -> None:
    """Part 6 for both drafters, with the tiers' trace events; the draft model's run also runs
    part 5 (each load governor mode), on the same tiers: one start-up less."""
    load = ["--parts", "6,5", "--loads", "2", "--load-gather", "0.25", "--load-governor", "off,auto",
            "--load-seconds", "1.5", "--load-warmup-s", "0.5", "--load-gateway", "direct-adaptive"]
    p = _bench([*SMOKE, "--method", method, "--max-branches", "2", *(load if method == "draft_model" else [])],
               tmp_path, env={"SPECSPLIT_TRACE": str(tmp_path / "trace")})
    assert p.returncode == 0, p.stderr[-4000:]
    res = _result(tmp_path)
    assert res["args"]["max_branches"] == 2 and res["method"] == method
    (row,) = res["part6"]["rows"]
    assert row["mode"] == "direct-pipelined" and row["outputs"] == {"checked": 2, "identical": 2,
                                                                   "first_difference_at": []}
    assert res["goals"]["lossless"]["met"]
    assert 0 <= row["drafted_ahead_rounds"] <= row["rounds"]
    # pipelined rounds draft ahead beside most verifies (an EAGLE head from its own state)
    assert row["drafted_ahead_rounds"] > 0 and 0.0 <= row["branch_hit_rate"] <= 1.0
    log = next(line for line in p.stderr.splitlines() if "part 6 direct-pipelined" in line)
    assert f"drafted ahead {row['drafted_ahead_rounds']} rounds, branch hits" in log
    # the round's segments across the three processes, from the trace events of its window (the
    # row keeps the largest; all of them from the events themselves)
    assert row["trace_segments"] and row["trace_segments"][0]["share"] >= row["trace_segments"][-1]["share"]
    assert len(list((tmp_path / "trace").glob("trace-*.jsonl"))) >= 3  # target, draft and gateways
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import trace_report

    events = trace_report.load(tmp_path / "trace")
    segs = {(s["from"], s["to"]) for s in trace_report.segments(events, *row["trace_window_ns"], top=1000)}
    assert ("loop.draft_send", "draft.received") in segs and ("target.step_start", "verify.forward") in segs
    if method == "draft_model":
        rows = res["part5"]["rows"]
        # plain, then speculation with the governor held off, then as it decides
        assert [(r["mode"], r["gather"], r["governor"]) for r in rows] == [
            ("plain", 0.25, "auto"), ("speculative", 0.25, "off"), ("speculative", 0.25, "auto")]
        assert rows[1]["governor_epochs"]["drafting"] == 0  # held off: not measured
        assert {"load2_spec_over_plain", "load2_spec_over_plain_governor_off"} <= res["goals"].keys()
        assert res["goals"]["part5_lossless"]["met"]


def test_gpu_services_bench_refuses_a_bad_max_branches_at_start(tmp_path: Path) -> None:
    p = _bench([*SMOKE, "--max-branches", "65"], tmp_path, timeout_s=120.0)
    assert p.returncode == 2 and "max_branches must be an integer in 0..64" in p.stderr
    assert not list(tmp_path.iterdir())  # refused before any tier started or any result was written


def test_gpu_services_bench_refuses_an_unknown_load_governor_at_start(tmp_path: Path) -> None:
    p = _bench([*SMOKE, "--load-governor", "sometimes"], tmp_path, timeout_s=120.0)
    assert p.returncode == 2 and "--load-governor takes auto, on, off" in p.stderr
