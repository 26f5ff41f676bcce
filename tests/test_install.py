"""The README's test command installs everything its tests need, Node packages included."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _planned(*args: str) -> str:
    env = {**os.environ, "SPECSPLIT_INSTALL_DRY_RUN": "1"}
    run = subprocess.run([str(ROOT / "scripts" / "install.sh"), *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout


@pytest.mark.timeout(90)
def test_dev_install_runs_npm_ci_for_the_node_client_test() -> None:
    out = _planned()
    assert "+ npm ci --prefix tests/services/node" in out
    assert '.[dev]' in out and "torch==" in out
    assert (ROOT / "tests" / "services" / "node" / "package-lock.json").is_file()  # what `npm ci` installs


@pytest.mark.timeout(90)
def test_runtime_install_needs_no_node() -> None:
    out = _planned("runtime")
    assert "npm" not in out and "-e ." in out
