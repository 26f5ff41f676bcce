"""Fixtures for the services' end-to-end tests: real servers on 127.0.0.1, port 0.

The three tiers run in-process on one asyncio loop in a background thread (`aio`), so the
tests themselves stay synchronous: they talk to the servers through blocking gRPC stubs,
the `openai` client and urllib, each call with a deadline. Failover tests start replicas as
real processes instead (`ReplicaProcess`), because only a process can be SIGKILLed.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from draft_service.config import DraftServiceConfig
from draft_service.server import start_draft
from gateway.config import GatewayConfig
from gateway.server import GatewayHandle, start_gateway
from specsplit import LLM, SamplingParams, SpeculativeConfig
from specsplit.launcher import free_port
from specsplit.outputs import CompletionOutput
from specsplit.proto.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from specsplit.serving.tier import TierHandle
from specsplit.testing import make_tiny_model
from target_service.config import TargetServiceConfig
from target_service.server import start_target

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]
KV_BYTES = 1 << 24  # 16 MiB of KV cache per tier: thousands of tokens of the tiny model
K = 4  # num_speculative_tokens of every test deployment
METHODS = ("draft_model", "ngram")


@pytest.fixture(scope="package", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """The tiny models gain nothing from intra-op threads; on a busy 2-core runner, spinning
    OpenMP threads of the in-process tiers and the reference make each step ~100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- an asyncio loop in a background thread ------------------------------------------------------


class LoopThread:
    """Runs the servers; tests submit coroutines with a deadline and block on the result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="services-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Read server state on the loop's thread (no races with the servers' callbacks)."""
        async def wrap() -> T:
            return fn()
        return self.run(wrap(), timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="session")
def aio() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


# --- tiny models and the plain-decoding reference --------------------------------------------------


@dataclass(frozen=True)
class TinyModels:
    target: Path
    draft: Path  # the target plus noise: a draft that agrees often, but not always


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    root = tmp_path_factory.mktemp("models")
    target = make_tiny_model(root / "target", seed=0)
    draft = make_tiny_model(root / "draft", seed=1, base=target, noise=0.05)
    return TinyModels(target, draft)


class Reference:
    """Plain greedy decoding of the target in-process (specsplit.LLM, no speculation)."""

    def __init__(self, model: Path) -> None:
        self.llm = LLM(str(model), kv_cache_memory_bytes=KV_BYTES)
        self.tokenizer = self.llm.get_tokenizer()
        self._cache: dict[tuple[str, int], CompletionOutput] = {}

    def greedy(self, prompt: str, max_tokens: int) -> CompletionOutput:
        key = (prompt, max_tokens)
        if key not in self._cache:
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            self._cache[key] = self.llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        return self._cache[key]

    def chat(self, messages: list[dict[str, str]], max_tokens: int, ignore_eos: bool = True) -> CompletionOutput:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)
        return self.llm.chat(messages, params, use_tqdm=False)[0].outputs[0]


@pytest.fixture(scope="session")
def reference(models: TinyModels) -> Reference:
    return Reference(models.target)


# --- in-process tiers --------------------------------------------------------------------------------


def spec_config(method: str, models: TinyModels, k: int = K, adaptive: bool = False) -> SpeculativeConfig:
    """Fixed k unless `adaptive`: the tiny draft costs as much as the tiny target, so adaptive k
    rightly stops drafting most of the time, which would leave the speculative paths untested."""
    if method == "ngram":
        return SpeculativeConfig(method="ngram", num_speculative_tokens=k, adaptive=adaptive)
    return SpeculativeConfig(method="draft_model", model=str(models.draft), num_speculative_tokens=k, adaptive=adaptive)


@dataclass
class Cluster:
    """One target tier, one draft tier per method, and gateways made on demand."""

    aio: LoopThread
    models: TinyModels
    target: TierHandle
    drafts: dict[str, TierHandle]
    _gateways: dict[tuple, GatewayHandle] = field(default_factory=dict)

    def gateway(self, method: str | None = "draft_model", pipeline: bool = True, adaptive: bool = False,
                **cfg: Any) -> GatewayHandle:
        """A gateway over this cluster's tiers (cached per configuration); method None = plain."""
        key = (method, pipeline, adaptive, tuple(sorted(cfg.items())))
        if key not in self._gateways:
            self._gateways[key] = self.aio.run(start_gateway(GatewayConfig(
                str(self.models.target), spec_config(method, self.models, adaptive=adaptive) if method else None,
                host="127.0.0.1", port=0, grpc_port=0, pipeline=pipeline,
                target_addresses=(f"127.0.0.1:{self.target.port}",),
                draft_addresses=(f"127.0.0.1:{self.drafts[method].port}",) if method else (), **cfg)))
        return self._gateways[key]

    def tiers(self) -> list[TierHandle]:
        return [self.target, *self.drafts.values()]

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until every tier has closed its sessions (closing is asynchronous) and freed its KV."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(sample(t, "specsplit_active_sessions") == 0 and sample(t, "specsplit_kv_cache_usage_ratio") == 0
                   for t in self.tiers()):
                return
            time.sleep(0.02)
        state = {t.metrics.tier: (sample(t, "specsplit_active_sessions"), sample(t, "specsplit_kv_cache_usage_ratio"))
                 for t in self.tiers()}
        raise AssertionError(f"tiers did not become idle within {timeout}s: {state}")


def sample(handle: TierHandle, name: str, labels: dict[str, str] | None = None) -> float:
    v = handle.metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if v is None else v


@pytest.fixture(scope="session")
def cluster(aio: LoopThread, models: TinyModels) -> Iterator[Cluster]:
    target = aio.run(start_target(TargetServiceConfig(
        str(models.target), host="127.0.0.1", grpc_port=0, metrics_port=free_port(), kv_cache_memory_bytes=KV_BYTES)))
    drafts = {m: aio.run(start_draft(DraftServiceConfig(
        str(models.target), spec_config(m, models), host="127.0.0.1", grpc_port=0,
        metrics_port=free_port() if m == "draft_model" else 0, kv_cache_memory_bytes=KV_BYTES)))
        for m in METHODS}
    c = Cluster(aio, models, target, drafts)
    yield c
    for g in c._gateways.values():
        aio.run(g.shutdown(0.5))
    for t in c.tiers():
        aio.run(t.shutdown(0.5))


@pytest.fixture(autouse=True)
def _no_leaked_sessions(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every test on the shared cluster: no session left open on any tier or gateway."""
    yield
    if "cluster" in request.fixturenames:
        c: Cluster = request.getfixturevalue("cluster")
        c.wait_idle()
        for g in c._gateways.values():
            pools = [g.core.targets] + ([g.core.drafts] if g.core.drafts is not None else [])
            assert all(n == 0 for p in pools for n in p.load.values()), "a gateway kept a tier session open"


# --- clients ---------------------------------------------------------------------------------------


def greedy_pb(max_tokens: int, **kw: Any) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def greedy_choice_pb(**kw: Any) -> common_pb2.TokenChoice:
    """What a tier session is opened with for greedy decoding (tiers never see stopping fields)."""
    return common_pb2.TokenChoice(temperature=0.0, **kw)


@dataclass
class Streamed:
    token_ids: list[int]
    text: str
    final: gateway_pb2.GenerateResponse | None


def stream_interrupted(address: str, prompt: str, max_tokens: int, after: int, interrupt: Callable[[], None],
                       timeout: float = 120.0) -> tuple[list[int], gateway_pb2.GenerateResponse | None]:
    """Stream a greedy completion through a gateway and call `interrupt` once, when `after` tokens
    have arrived and the stream is still going; returns the tokens and the final message."""
    ids: list[int] = []
    final = None
    done = False
    with grpc.insecure_channel(address) as ch:
        call = gateway_pb2_grpc.GatewayStub(ch).Generate(
            gateway_pb2.GenerateRequest(text=prompt, params=greedy_pb(max_tokens)), timeout=timeout)
        for msg in call:
            ids += msg.token_ids
            if msg.HasField("usage"):
                final = msg
            if not done and len(ids) >= after:
                assert not msg.HasField("usage"), "the stream ended before the interruption"
                interrupt()
                done = True
    return ids, final


def stream_text(address: str, prompt: str, params: common_pb2.SamplingParams, timeout: float = 60.0) -> Streamed:
    """Generate through the public gRPC API, collecting completion 0."""
    with grpc.insecure_channel(address) as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        ids: list[int] = []
        text = ""
        final = None
        for m in stub.Generate(gateway_pb2.GenerateRequest(text=prompt, params=params), timeout=timeout):
            ids += m.token_ids
            text += m.text
            if m.HasField("usage"):
                final = m
        return Streamed(ids, text, final)


def health_status(address: str, service: str = "", timeout: float = 5.0) -> int:
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                   timeout=timeout).status


# --- replicas as processes -------------------------------------------------------------------------


class ReplicaProcess:
    """`python -m specsplit.cli target|draft ... --grpc-port 0`; the port is read from its log."""

    def __init__(self, kind: str, args: list[str], log_path: Path, port: int = 0) -> None:
        """`port` 0: any free port; a fixed one lets a restarted replica come back at the same address."""
        self.kind = kind
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "specsplit.cli", kind, *args, "--host", "127.0.0.1", "--grpc-port", str(port),
             "--metrics-port", "0", "--kv-cache-memory-bytes", str(KV_BYTES), "--log-level", "info"],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 240.0) -> None:  # four replicas importing torch at once on 2 busy cores
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(rb"ready on port (\d+)", self.log_path.read_bytes())
            if m:
                self.port = int(m.group(1))
                assert health_status(self.address) == health_pb2.HealthCheckResponse.SERVING
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"{self.kind} replica did not start:\n{self.log_path.read_text()[-3000:]}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
