"""`specsplit up` as a user runs it: the model name as typed is the served name; SIGTERM stops
every process it started, as Ctrl-C does; its servers die with it even when it is SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from openai import OpenAI

from specsplit.launcher import PARENT_ENV, free_port
from specsplit.models.convert import Marker
from specsplit.proto.v1 import gateway_pb2, gateway_pb2_grpc
from tests.services.conftest import ROOT, TinyModels, greedy_pb
from tests.services.test_http import http

NAME = "smollm2-135m"  # a catalogue name: `up` resolves it to a folder in the cache


@dataclass
class Up:
    proc: subprocess.Popen
    port: int
    grpc_port: int
    log: Path


def _children(pid: int) -> list[int]:
    """Every descendant of `pid` (from /proc)."""
    parents: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            parents[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out += kids
        todo += kids
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def up(models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    """`specsplit up smollm2-135m`, the catalogue entry already in a private cache (no network)."""
    cache = tmp_path_factory.mktemp("cache")
    folder = cache / "models" / NAME
    folder.mkdir(parents=True)
    for f in models.target.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    Marker(NAME, "test", "none.gguf", 0, "float32", "test", 0.0, "now").write(folder)
    log = cache / "up.log"
    port, grpc_port = free_port(), free_port()
    env = {**os.environ, "SPECSPLIT_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("SPECSPLIT_MODEL", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "specsplit.cli", "up", NAME, "--port", str(port),
                                 "--grpc-port", str(grpc_port), "--log-level", "info"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    u = Up(proc, port, grpc_port, log)
    try:
        deadline = time.monotonic() + 150
        while "specsplit is up" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield u
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.timeout(200)
def test_up_serves_and_accepts_the_model_name_as_typed(up: Up) -> None:
    assert f"(model '{NAME}')" in up.log.read_text()
    assert [m["id"] for m in http(up.port, "/v1/models")[2]["data"]] == [NAME]
    client = OpenAI(base_url=f"http://127.0.0.1:{up.port}/v1", api_key="none", timeout=60)
    out = client.completions.create(model=NAME, prompt="def f(x):", max_tokens=4, temperature=0)
    assert out.model == NAME and out.usage.completion_tokens >= 1
    with grpc.insecure_channel(f"127.0.0.1:{up.grpc_port}") as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        assert [m.id for m in stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=10).models] == [NAME]
        r = stub.GenerateUnary(gateway_pb2.GenerateRequest(model=NAME, text="def f(x):", params=greedy_pb(4)),
                               timeout=60)
        assert r.usage.completion_tokens == 4


@pytest.mark.timeout(200)
def test_sigterm_to_up_stops_every_process_it_started(up: Up) -> None:
    children = _children(up.proc.pid)
    assert len(children) >= 3, children  # target, draft, gateway
    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(60) == 0
    deadline = time.monotonic() + 30
    while any(_alive(c) for c in children):
        assert time.monotonic() < deadline, [c for c in children if _alive(c)]
        time.sleep(0.2)
    for port in (up.port, up.grpc_port):  # nothing serves on the ports any more
        with pytest.raises(OSError):
            http(port, "/health")


@pytest.mark.timeout(60)
def test_a_server_started_by_up_dies_with_up_even_when_up_is_sigkilled(tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", f"""
import os, subprocess, sys, time
env = {{**os.environ, {PARENT_ENV!r}: str(os.getpid())}}
child = subprocess.Popen([sys.executable, "-c",
    "from specsplit.cli import die_with_parent; die_with_parent(); open({str(tmp_path / 'armed')!r}, 'w').close(); "
    "import time; time.sleep(120)"], env=env)
print(child.pid, flush=True)
time.sleep(120)
"""], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())  # type: ignore[union-attr]
    deadline = time.monotonic() + 40
    while not (tmp_path / "armed").exists():
        assert time.monotonic() < deadline and _alive(child)
        time.sleep(0.1)
    parent.kill()
    parent.wait(10)
    deadline = time.monotonic() + 10
    while _alive(child):
        if time.monotonic() > deadline:
            os.kill(child, signal.SIGKILL)
            pytest.fail("the child outlived its SIGKILLed parent")
        time.sleep(0.1)
