"""EAGLE failover: SIGKILL the draft replica that holds the session mid-stream; no token is
lost, and the replica that takes over rebuilds its head from every committed position.

The victim is a real `specsplit draft` process (an EAGLE-3 head, loaded by the CLI); the
survivor runs in this process so the states it receives can be checked. Gateway round: the
gateway re-opens the draft session on the survivor and re-opens the target session, whose
re-prefill returns every position's states. Direct round: the target tier reports the draft
failure and the gateway starts the completion again with the survivor (the target re-prefills).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.services.conftest import LoopThread, ReplicaProcess, stream_interrupted
from tests.services.eagle_cluster import (
    LAYERS,
    EagleCluster,
    check_recorded_states,
    one_completion_fixtures,
)

PROMPT = "def fibonacci(n):"
MAX_TOKENS = 300  # still streaming when the replica dies
KILL_AFTER = 20  # tokens received before the kill
METHOD = "eagle3"


eagle_models, eagle_cluster, reference = one_completion_fixtures("eagle-failover", PROMPT, MAX_TOKENS, METHOD)


def _victim(eagle_models: dict[str, Path], log: Path) -> ReplicaProcess:
    spec = {"method": METHOD, "model": str(eagle_models[METHOD]), "num_speculative_tokens": 3, "adaptive": False}
    p = ReplicaProcess("draft", [str(eagle_models["target"]), "--speculative-config", json.dumps(spec)], log)
    p.wait_ready()
    return p


@pytest.mark.timeout(300)
@pytest.mark.parametrize("round_mode", ["gateway", "direct"])
def test_killing_the_eagle_draft_replica_loses_no_token_and_rebuilds_the_head(
        aio: LoopThread, eagle_cluster: EagleCluster, eagle_models, reference, round_mode, tmp_path):
    victim = _victim(eagle_models, tmp_path / "victim.log")
    rec = eagle_cluster.recorders[METHOD]
    rec.seen.clear()
    gw = eagle_cluster.gateway(METHOD, round_mode, drafts=(victim.address,), round_timeout_s=10.0)
    pool = gw.core.drafts
    assert pool is not None
    survivor = f"127.0.0.1:{eagle_cluster.drafts[METHOD].port}"
    try:
        def kill_the_victim() -> None:
            assert not rec.seen, "the survivor drafted before the kill"
            # discovery finds a second draft replica while the first one holds the session
            aio.call(lambda: pool.set_addresses([victim.address, survivor]))
            victim.kill()

        ids, final = stream_interrupted(f"127.0.0.1:{gw.port}", PROMPT, MAX_TOKENS, KILL_AFTER, kill_the_victim)
        assert final is not None and victim.proc.poll() is not None
        assert ids == reference  # no token lost or repeated
        assert not final.stats.draft_fallback and final.stats.drafted_tokens > 0
        assert victim.address in pool._failed_at
        # the survivor's head was rebuilt from position 0: the target re-sent every committed
        # position's states (a re-prefill), and each state it got is the target's own
        assert rec.seen
        covered = check_recorded_states(rec, eagle_models["target"], LAYERS[METHOD])
        assert covered == set(range(max(len(t) for t, _ in rec.seen) - 1))
        assert any(len(t) - 1 - s.shape[0] == 0 and len(t) > KILL_AFTER for t, s in rec.seen)  # from 0, after the kill
    finally:
        victim.stop()
