"""Served model names (vLLM's --served-model-name): what ListModels and /v1/models show and
what requests may name; plus `specsplit --version`."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest

from specsplit import __version__
from specsplit.cli import build_parser
from specsplit.proto.v1 import gateway_pb2, gateway_pb2_grpc
from tests.services.conftest import ROOT, Cluster, greedy_pb
from tests.services.test_http import http

NAMES = ("coder", "org/coder-1.5b")


@pytest.mark.timeout(120)
def test_gateway_lists_and_accepts_every_served_name_and_only_those(cluster: Cluster) -> None:
    gw = cluster.gateway("ngram", served_model_name=NAMES)
    assert [m["id"] for m in http(gw.http_port, "/v1/models")[2]["data"]] == list(NAMES)
    for name in NAMES:
        status, _, body = http(gw.http_port, "/v1/completions", {"model": name, "prompt": "hi", "max_tokens": 2})
        assert status == 200, body
    status, _, body = http(gw.http_port, "/v1/completions", {"model": str(cluster.models.target), "prompt": "hi",
                                                             "max_tokens": 2})
    assert status == 404 and "'coder', 'org/coder-1.5b'" in body["error"]["message"]
    with grpc.insecure_channel(f"127.0.0.1:{gw.port}") as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        assert [m.id for m in stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=10).models] == list(NAMES)
        r = stub.GenerateUnary(gateway_pb2.GenerateRequest(model=NAMES[1], text="hi", params=greedy_pb(2)), timeout=30)
        assert r.usage.completion_tokens == 2
        with pytest.raises(grpc.RpcError) as e:
            stub.GenerateUnary(gateway_pb2.GenerateRequest(model="other", text="hi", params=greedy_pb(2)), timeout=30)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("command", ["up", "gateway"])
def test_served_model_name_flag_takes_several_names(command: str) -> None:
    a = build_parser().parse_args([command, "/models/x", "--served-model-name", "a", "b/c"])
    assert a.served_model_name == ["a", "b/c"]


def test_served_model_names_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECSPLIT_SERVED_MODEL_NAME", "a, b")
    assert build_parser().parse_args(["gateway", "m"]).served_model_name == ["a", "b"]


@pytest.mark.timeout(60)
def test_version_flag_prints_the_package_version() -> None:
    run = subprocess.run([sys.executable, "-m", "specsplit.cli", "--version"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == f"specsplit {__version__}"
