"""A non-Python client: Node's @grpc/grpc-js calls Gateway.Generate from the public protos.

scripts/install.sh runs `npm ci --prefix tests/services/node` (node_modules is git-ignored).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from specsplit.client import Client
from specsplit.sampling.params import SamplingParams
from tests.services.conftest import Cluster, Reference

NODE_DIR = Path(__file__).parent / "node"
PROMPT = "def fibonacci(n):"


def _missing(why: str) -> None:
    """Skip locally; in CI (scripts/test.sh installs the Node packages) a missing piece fails."""
    if os.environ.get("CI"):
        pytest.fail(f"{why} (CI must run this test: scripts/install.sh sets it up)")
    pytest.skip(why)


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        _missing("node is not installed")
    for module in ("@grpc/grpc-js", "@grpc/proto-loader"):
        if not (NODE_DIR / "node_modules" / module / "package.json").exists():
            _missing(f"{module} is not installed: run `npm ci --prefix tests/services/node` (scripts/install.sh does)")
    return node  # type: ignore[return-value]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("method", ["draft_model", "ngram"])
def test_node_grpc_client_streams_the_same_text_as_python(cluster: Cluster, reference: Reference, method: str) -> None:
    node = _node()
    gw = cluster.gateway(method)
    address = f"127.0.0.1:{gw.port}"
    run = subprocess.run([node, str(NODE_DIR / "generate.js"), address, PROMPT, "40"], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    final = json.loads(run.stderr.strip().splitlines()[-1])
    assert final["finish_reason"] == "FINISH_REASON_LENGTH"
    assert final["usage"]["completion_tokens"] == 40
    assert int(final["stats"]["rounds"]) >= 1

    with Client(address, timeout=30) as c:
        events = list(c.stream(PROMPT, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)))
    python_text = "".join(e.text for e in events)
    assert run.stdout == python_text == reference.greedy(PROMPT, 40).text
