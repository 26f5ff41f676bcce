"""EAGLE deployments that cannot work are refused at start with one clear message (the draft
tier, the gateway, `specsplit up`), never by a crash mid-request; bad EAGLE fields on the
wire are INVALID_ARGUMENT."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from draft_service.config import DraftServiceConfig
from draft_service.server import start_draft
from gateway.config import GatewayConfig
from gateway.server import start_gateway
from specsplit import LLM, SamplingParams, SpeculativeConfig
from specsplit.launcher import free_port
from specsplit.proto.v1 import draft_pb2, draft_pb2_grpc, target_pb2, target_pb2_grpc
from specsplit.speculation.eagle.wire import pack_states
from specsplit.testing import make_tiny_model
from tests.services.conftest import ROOT, Cluster, LoopThread, greedy_choice_pb
from tests.services.eagle_cluster import EagleCluster, make_eagle_models
from tests.speculation.eagle_layouts import write_eagle3


@pytest.fixture(scope="module")
def eagle_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eagle-config")
    models = make_eagle_models(root)
    wide = make_tiny_model(root / "wide", layers=8, hidden_size=96, init_std=0.5)  # another target's head
    models["wide-head"] = write_eagle3(root / "wide-head", wide, list(range(0, 384, 2)))
    return models


@pytest.fixture(scope="module")
def eagle_cluster(aio: LoopThread, eagle_models: dict[str, Path]) -> Iterator[EagleCluster]:
    c = EagleCluster(aio, eagle_models, methods=("eagle3",))
    yield c
    c.close()


def _spec(method: str, head: Path | str) -> SpeculativeConfig:
    return SpeculativeConfig(method=method, model=str(head), num_speculative_tokens=3)


BAD = {  # name: (method, head key or path, message)
    "missing head folder": ("eagle3", "/nonexistent/head", "no such folder, and not a hub id"),
    "head hub id not fetchable": ("eagle3", "no-such-org/no-such-head", "Hugging Face hub"),
    "head of another target": ("eagle3", "wide-head", "96"),
    "eagle3 head named eagle": ("eagle", "eagle3", "holds an 'eagle3' head"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(BAD))
def test_draft_tier_refuses_a_bad_eagle_config_at_start(aio: LoopThread, eagle_models, case):
    method, head, message = BAD[case]
    cfg = DraftServiceConfig(str(eagle_models["target"]), _spec(method, eagle_models.get(head, head)),
                             host="127.0.0.1", grpc_port=0, metrics_port=0)
    with pytest.raises(ValueError, match=re.escape(message)):
        aio.run(start_draft(cfg))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", ["missing head folder", "head of another target"])
def test_gateway_refuses_a_bad_eagle_config_at_start(aio: LoopThread, eagle_models, case):
    method, head, message = BAD[case]
    cfg = GatewayConfig(str(eagle_models["target"]), _spec(method, eagle_models.get(head, head)), host="127.0.0.1",
                        port=0, grpc_port=0, target_addresses=("127.0.0.1:1",), draft_addresses=("127.0.0.1:2",))
    with pytest.raises(ValueError, match=re.escape(message)):
        aio.run(start_gateway(cfg))


@pytest.mark.parametrize("spec", [
    {"method": "eagle3", "model": "/h", "prompt_lookup_max": 3},
    {"method": "eagle", "model": "/h", "prompt_lookup_min": 2},
    {"method": "eagle3", "model": "/h", "draft_tensor_parallel_size": 2},
    {"method": "eagle3"},
])
def test_eagle_config_with_keys_of_other_methods_is_refused(spec):
    with pytest.raises(ValueError, match="speculative_config"):
        SpeculativeConfig.from_any(json.dumps(spec))


@pytest.mark.timeout(60)
def test_specsplit_up_refuses_a_head_of_another_target_before_starting_anything(eagle_models):
    spec = {"method": "eagle3", "model": str(eagle_models["wide-head"]), "num_speculative_tokens": 3}
    run = subprocess.run(
        [sys.executable, "-m", "specsplit.cli", "up", str(eagle_models["target"]), "--speculative-config",
         json.dumps(spec), "--port", str(free_port()), "--grpc-port", str(free_port())],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=50)
    assert run.returncode != 0
    assert "hidden size is 64" in run.stderr and "starting target" not in run.stderr


@pytest.mark.timeout(150)
def test_specsplit_up_serves_an_eagle3_head(eagle_models):
    """`specsplit up` with an EAGLE-3 head: the answer equals the target alone's."""
    spec = {"method": "eagle3", "model": str(eagle_models["eagle3"]), "num_speculative_tokens": 3}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("SPECSPLIT_MODEL", None)
    run = subprocess.run(
        [sys.executable, "-m", "specsplit.cli", "up", str(eagle_models["target"]), "--speculative-config",
         json.dumps(spec), "--prompt", "Write a loop.", "--max-tokens", "12", "--port", str(free_port()),
         "--grpc-port", str(free_port())], cwd=ROOT, env=env, capture_output=True, text=True, timeout=140)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "draft (eagle3)" in run.stderr
    ref = LLM(str(eagle_models["target"])).chat([{"role": "user", "content": "Write a loop."}],
                                                SamplingParams(max_tokens=12, temperature=0.0), use_tqdm=False)
    assert run.stdout.strip() == ref[0].outputs[0].text.strip()


@pytest.mark.timeout(60)
def test_target_tier_refuses_hidden_layers_outside_the_model(eagle_cluster: EagleCluster):
    with grpc.insecure_channel(f"127.0.0.1:{eagle_cluster.target.port}") as ch:
        call = target_pb2_grpc.TargetServiceStub(ch).Session(iter([target_pb2.TargetClientMessage(
            open=target_pb2.TargetOpen(token_ids=[1, 2, 3], params=greedy_choice_pb(), hidden_layers=[2, 99]))]),
            timeout=30)
        with pytest.raises(grpc.RpcError) as e:
            list(call)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "hidden layers" in e.value.details()


def _propose_with_states(address: str, data: bytes) -> grpc.RpcError:
    msgs = [draft_pb2.DraftClientMessage(open=draft_pb2.DraftOpen(token_ids=[1, 2, 3, 4], params=greedy_choice_pb())),
            draft_pb2.DraftClientMessage(propose=draft_pb2.DraftPropose(round_id=1, prefix_len=4, k=2,
                                                                        hidden_states=data))]
    with grpc.insecure_channel(address) as ch, pytest.raises(grpc.RpcError) as e:
        list(draft_pb2_grpc.DraftServiceStub(ch).Session(iter(msgs), timeout=30))
    return e.value


@pytest.mark.timeout(60)
def test_draft_tier_refuses_states_of_the_wrong_width(eagle_cluster: EagleCluster):
    import torch

    err = _propose_with_states(f"127.0.0.1:{eagle_cluster.drafts['eagle3'].port}", pack_states(torch.zeros(2, 64)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT  # EAGLE-3 reads 3 x 64 values a position
    assert "hidden_states" in err.details()


@pytest.mark.timeout(60)
def test_a_draft_tier_without_a_head_refuses_states(cluster: Cluster):
    import torch

    err = _propose_with_states(f"127.0.0.1:{cluster.drafts['ngram'].port}", pack_states(torch.zeros(2, 64)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "reads no hidden states" in err.details()



@pytest.mark.timeout(60)
def test_a_propose_without_states_gets_an_empty_block(eagle_cluster: EagleCluster):
    """A guess made before the verify (no states of the unverified tokens): the head drafts nothing."""
    msgs = [draft_pb2.DraftClientMessage(open=draft_pb2.DraftOpen(token_ids=[1, 2, 3, 4], params=greedy_choice_pb())),
            draft_pb2.DraftClientMessage(propose=draft_pb2.DraftPropose(round_id=1, prefix_len=4, k=3))]
    with grpc.insecure_channel(f"127.0.0.1:{eagle_cluster.drafts['eagle3'].port}") as ch:
        (reply,) = list(draft_pb2_grpc.DraftServiceStub(ch).Session(iter(msgs), timeout=30))
    assert reply.proposal.round_id == 1 and list(reply.proposal.token_ids) == []
