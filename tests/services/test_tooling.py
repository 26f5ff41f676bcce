"""The repository's tooling around the services: generated code, `specsplit up`, docker-compose."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from specsplit.launcher import free_port
from tests.services.conftest import ROOT, Reference, TinyModels


@pytest.mark.timeout(60)
def test_generated_protobuf_code_is_fresh() -> None:
    run = subprocess.run([sys.executable, "-m", "specsplit.proto.generate", "--check"], cwd=ROOT,
                         capture_output=True, text=True, timeout=50)
    assert run.returncode == 0, run.stderr + run.stdout
    assert "up to date" in run.stdout


@pytest.mark.timeout(150)
def test_specsplit_up_streams_an_answer_with_statistics(models: TinyModels, reference: Reference) -> None:
    messages = [{"role": "user", "content": "Write a loop."}]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("SPECSPLIT_MODEL", None)
    run = subprocess.run(
        [sys.executable, "-m", "specsplit.cli", "up", str(models.target), "--prompt", messages[0]["content"],
         "--max-tokens", "8", "--port", str(free_port()), "--grpc-port", str(free_port())],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=140)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "specsplit is up" in run.stderr
    summary = re.search(r"\[(\d+) tokens, finish=(\w+), acceptance (\d+)%, ([\d.]+) tokens/round over (\d+) rounds, "
                        r"(\d+) pipelined\] in [\d.]+s = [\d.]+ tokens/s", run.stderr)
    assert summary, run.stderr[-2000:]
    ref = reference.chat(messages, 8, ignore_eos=False)
    assert int(summary.group(1)) == len(ref.token_ids) and summary.group(2) == ref.finish_reason
    assert run.stdout.strip() == ref.text.strip()


@pytest.mark.timeout(60)
def test_docker_compose_config_is_valid() -> None:
    compose = ROOT / "docker-compose.yml"
    if not compose.exists():
        pytest.skip("docker-compose.yml does not exist yet")
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    run = subprocess.run([exe, "-f", str(compose), "config", "-q"], cwd=ROOT, capture_output=True, text=True,
                         timeout=50)
    assert run.returncode == 0, run.stderr
    services = subprocess.run([exe, "-f", str(compose), "config", "--services"], cwd=ROOT, capture_output=True,
                              text=True, timeout=50).stdout.split()
    for tier in ("gateway", "target", "draft"):
        assert any(tier in s for s in services), f"no {tier} service in {services}"
