"""Replicas as real processes: SIGKILL the one holding a session mid-stream; no token is lost.

The gateway re-opens the session on another replica with the prompt and every committed
token, so the output stays equal to plain greedy decoding of the target.
Tests run in file order on one set of processes: each kill leaves one replica fewer.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator

import pytest

from gateway.config import GatewayConfig
from gateway.server import GatewayHandle, start_gateway
from specsplit.proto.v1 import gateway_pb2
from tests.services.conftest import (
    LoopThread,
    Reference,
    ReplicaProcess,
    TinyModels,
    spec_config,
    stream_interrupted,
)

PROMPT = "def fibonacci(n):"
MAX_TOKENS = 300  # long enough to still be streaming when the replica dies (~3 s here)
KILL_AFTER = 20  # tokens received before the kill


@pytest.fixture(scope="module")
def replicas(models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ReplicaProcess]]:
    logs = tmp_path_factory.mktemp("replica-logs")
    spec = dataclasses.asdict(spec_config("draft_model", models))
    procs = {
        "target-a": ReplicaProcess("target", [str(models.target)], logs / "target-a.log"),
        "target-b": ReplicaProcess("target", [str(models.target)], logs / "target-b.log"),
        "draft-a": ReplicaProcess("draft", [str(models.target), "--speculative-config", json.dumps(spec)],
                                  logs / "draft-a.log"),
        "draft-b": ReplicaProcess("draft", [str(models.target), "--speculative-config", json.dumps(spec)],
                                  logs / "draft-b.log"),
    }
    try:
        for p in procs.values():
            p.wait_ready()
        yield procs
    finally:
        for p in procs.values():
            p.stop()


def _alive(replicas: dict[str, ReplicaProcess], kind: str) -> list[ReplicaProcess]:
    return [p for p in replicas.values() if p.kind == kind and p.proc.poll() is None]


def _gateway(aio: LoopThread, models: TinyModels, replicas: dict[str, ReplicaProcess]) -> GatewayHandle:
    return aio.run(start_gateway(GatewayConfig(
        str(models.target), spec_config("draft_model", models), host="127.0.0.1", port=0, grpc_port=0,
        target_addresses=tuple(p.address for p in _alive(replicas, "target")),
        draft_addresses=tuple(p.address for p in _alive(replicas, "draft")), round_timeout_s=10.0)))


def _stream_and_kill(aio: LoopThread, gw: GatewayHandle, replicas: dict[str, ReplicaProcess], kind: str
                     ) -> tuple[list[int], gateway_pb2.GenerateResponse, ReplicaProcess]:
    """Stream PROMPT; after KILL_AFTER tokens SIGKILL the `kind` replica that holds the session."""
    pool = gw.core.targets if kind == "target" else gw.core.drafts
    victim = None

    def kill_the_holder() -> None:
        nonlocal victim
        load = aio.call(lambda: dict(pool.load))
        holding = [a for a, n in load.items() if n > 0]
        assert len(holding) == 1, load
        victim = next(p for p in replicas.values() if p.address == holding[0])
        victim.kill()

    ids, final = stream_interrupted(f"127.0.0.1:{gw.port}", PROMPT, MAX_TOKENS, KILL_AFTER, kill_the_holder, timeout=90)
    assert final is not None and victim is not None
    return ids, final, victim


def _failovers(gw: GatewayHandle) -> float:
    return gw.core.metrics.registry.get_sample_value("specsplit_failovers_total") or 0.0


@pytest.mark.timeout(180)
def test_killing_the_draft_replica_mid_stream_loses_no_token(
        aio: LoopThread, models: TinyModels, reference: Reference, replicas: dict[str, ReplicaProcess]) -> None:
    assert len(_alive(replicas, "draft")) == 2
    gw = _gateway(aio, models, replicas)
    try:
        ids, final, victim = _stream_and_kill(aio, gw, replicas, "draft")
        assert ids == reference.greedy(PROMPT, MAX_TOKENS).token_ids
        assert final.usage.completion_tokens == MAX_TOKENS
        assert not final.stats.draft_fallback  # moved to the other draft replica
        assert victim.proc.poll() is not None
        assert victim.address in gw.core.drafts._failed_at  # the pool noticed
        assert _failovers(gw) >= 1
        assert final.stats.drafted_tokens > 0
    finally:
        aio.run(gw.shutdown(1.0))


@pytest.mark.timeout(180)
def test_killing_the_target_replica_mid_stream_loses_no_token(
        aio: LoopThread, models: TinyModels, reference: Reference, replicas: dict[str, ReplicaProcess]) -> None:
    assert len(_alive(replicas, "target")) == 2
    gw = _gateway(aio, models, replicas)
    try:
        ids, final, victim = _stream_and_kill(aio, gw, replicas, "target")
        assert ids == reference.greedy(PROMPT, MAX_TOKENS).token_ids
        assert final.usage.completion_tokens == MAX_TOKENS
        assert victim.address in gw.core.targets._failed_at
        assert _failovers(gw) >= 1
        survivor = _alive(replicas, "target")[0]
        assert survivor.address not in gw.core.targets._failed_at
    finally:
        aio.run(gw.shutdown(1.0))


@pytest.mark.timeout(180)
def test_killing_the_last_draft_replica_falls_back_to_plain_decoding(
        aio: LoopThread, models: TinyModels, reference: Reference, replicas: dict[str, ReplicaProcess]) -> None:
    if len(_alive(replicas, "draft")) != 1:
        pytest.skip("needs exactly one draft replica left (run the whole module)")
    gw = _gateway(aio, models, replicas)
    try:
        ids, final, _ = _stream_and_kill(aio, gw, replicas, "draft")
        assert ids == reference.greedy(PROMPT, MAX_TOKENS).token_ids
        assert final.stats.draft_fallback  # no draft left: the target decoded the rest alone
    finally:
        aio.run(gw.shutdown(1.0))

