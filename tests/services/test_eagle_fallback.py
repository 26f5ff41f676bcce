"""EAGLE after the draft tier is lost: the completion decodes plainly, and the target stops
computing and sending the hidden states that no draft reads any more.

The draft tier here is an in-process EAGLE-3 tier of its own, shut down mid-stream (its sessions
are handed back UNAVAILABLE), with no other draft replica to move to. Both rounds: the gateway's
(`RemoteTarget`: the states cross the wire to the gateway) and the direct one (`LocalTarget`:
the target tier's own loop).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from draft_service.config import DraftServiceConfig
from draft_service.server import start_draft
from specsplit.proto.v1 import target_pb2, target_pb2_grpc
from specsplit.serving.target_link import RemoteTarget
from target_service.generate import LocalTarget
from tests.services.conftest import KV_BYTES, LoopThread, greedy_choice_pb, stream_interrupted
from tests.services.eagle_cluster import (
    LAYERS,
    EagleCluster,
    eagle_spec,
    one_completion_fixtures,
)

PROMPT = "def fibonacci(n):"
MAX_TOKENS = 96  # still streaming when the draft tier goes away
KILL_AFTER = 12  # tokens received before it does
METHOD = "eagle3"


eagle_models, eagle_cluster, reference = one_completion_fixtures("eagle-fallback", PROMPT, MAX_TOKENS, METHOD)


@pytest.fixture
def verdict_states(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bytes of hidden states in every verdict a completion loop got, in order (both links)."""
    seen: list[int] = []
    for cls in (RemoteTarget, LocalTarget):
        def spy(self: Any, block: list[int], q: Any, _verify: Any = cls.verify) -> Any:
            async def run() -> Any:
                v = await _verify(self, block, q)
                seen.append(len(v.hidden_states))
                return v
            return run()
        monkeypatch.setattr(cls, "verify", spy)
    return seen


@pytest.mark.timeout(240)
@pytest.mark.parametrize("round_mode", ["gateway", "direct"])
def test_after_the_eagle_draft_is_lost_the_target_sends_no_states_and_output_stays_plain(
        aio: LoopThread, eagle_cluster: EagleCluster, eagle_models: dict[str, Path], reference: list[int],
        verdict_states: list[int], round_mode: str) -> None:
    draft = aio.run(start_draft(DraftServiceConfig(
        str(eagle_models["target"]), eagle_spec(METHOD, eagle_models), host="127.0.0.1", grpc_port=0,
        metrics_port=0, kv_cache_memory_bytes=KV_BYTES)), timeout=120)
    gw = eagle_cluster.gateway(METHOD, round_mode, drafts=(f"127.0.0.1:{draft.port}",))
    states_before = 0

    def lose_the_draft() -> None:
        nonlocal draft, states_before
        states_before = sum(1 for n in verdict_states if n)
        aio.run(draft.shutdown(0.0))
        draft = None

    try:
        ids, final = stream_interrupted(f"127.0.0.1:{gw.port}", PROMPT, MAX_TOKENS, KILL_AFTER, lose_the_draft)
    finally:
        if draft is not None:
            aio.run(draft.shutdown(0.0))
    assert final is not None and ids == reference  # token-identical to the target alone
    assert final.stats.draft_fallback and final.stats.drafted_tokens > 0
    assert states_before > 0, "the head never got states"
    # once a verdict came back without states, none came with them again, for the whole rest
    first_empty = next((i for i, n in enumerate(verdict_states) if n == 0), None)
    assert first_empty is not None, "the target kept sending states after the fallback"
    assert all(n > 0 for n in verdict_states[:first_empty])
    assert not any(verdict_states[first_empty:])
    assert len(verdict_states) - first_empty >= 10  # the plain rest of the completion


@pytest.mark.timeout(60)
def test_a_verify_that_stops_states_gets_none_from_then_on(eagle_cluster: EagleCluster) -> None:
    def session(layers: tuple[int, ...], stop_at: int | None) -> list[target_pb2.VerifyResult]:
        msgs = [target_pb2.TargetClientMessage(open=target_pb2.TargetOpen(
            token_ids=[5, 9, 14, 3, 7], params=greedy_choice_pb(), hidden_layers=layers))]
        msgs += [target_pb2.TargetClientMessage(verify=target_pb2.TargetVerify(
            round_id=i, draft_ids=[4, 4], stop_hidden_states=i == stop_at)) for i in range(1, 6)]
        with grpc.insecure_channel(f"127.0.0.1:{eagle_cluster.target.port}") as ch:
            return [m.result for m in target_pb2_grpc.TargetServiceStub(ch).Session(iter(msgs), timeout=30)]

    plain, told = session((), None), session(LAYERS[METHOD], 3)
    assert [len(r.hidden_states) > 0 for r in told] == [True, True, False, False, False]
    assert [(r.num_accepted, r.next_token) for r in told] == [(r.num_accepted, r.next_token) for r in plain]
