"""API keys on the gateway's public APIs (OpenAI HTTP and gRPC), and per-key limits."""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.server import GatewayHandle
from specsplit.proto.v1 import gateway_pb2, gateway_pb2_grpc
from tests.security.conftest import SecureCluster, write_atomically
from tests.services.conftest import Reference, greedy_pb

openai = pytest.importorskip("openai")

ALICE = "sk-alice-0123456789abcdef"
BOB = "sk-bob-fedcba9876543210"
EVE = "sk-eve-not-a-key-00000000"
PROMPT = "the quick brown fox"


@pytest.fixture
def keyfile(tmp_path: Path) -> Path:
    """A key file laid out like a mounted Kubernetes Secret: keys -> ..data/keys, ..data -> a dated folder."""
    _swap_secret(tmp_path, f"alice:{ALICE}\n# a comment\n\n{BOB}   # bob, unnamed\n", 1)
    return tmp_path / "keys"


def _swap_secret(folder: Path, text: str, version: int) -> None:
    """What the kubelet does on a Secret update: write a new folder, then swap the ..data link."""
    new = folder / f"..v{version}"
    new.mkdir()
    (new / "keys").write_text(text)
    tmp = folder / "..data_tmp"
    tmp.symlink_to(new.name)
    os.replace(tmp, folder / "..data")
    if not (folder / "keys").exists():
        (folder / "keys").symlink_to("..data/keys")


@pytest.fixture
def gw(secure: SecureCluster, keyfile: Path) -> Any:
    g = secure.gateway(api_key_file=str(keyfile))
    yield g
    secure.close_gateway(g)


def client(g: GatewayHandle, key: str) -> Any:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{g.http_port}/v1", api_key=key, max_retries=0, timeout=30)


def http(g: GatewayHandle, path: str, key: str | None = None, body: dict | None = None
         ) -> tuple[int, dict[str, str], Any]:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    req = urllib.request.Request(f"http://127.0.0.1:{g.http_port}{path}", headers=headers,
                                 data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, hdrs, raw = r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        status, hdrs, raw = e.code, dict(e.headers), e.read()
    return status, hdrs, json.loads(raw) if hdrs.get("Content-Type", "").startswith("application/json") else raw


def grpc_generate(g: GatewayHandle, key: str | None, max_tokens: int = 8) -> gateway_pb2.GenerateResponse:
    md = (("authorization", f"Bearer {key}"),) if key else None
    with grpc.insecure_channel(f"127.0.0.1:{g.port}") as ch:
        return gateway_pb2_grpc.GatewayStub(ch).GenerateUnary(
            gateway_pb2.GenerateRequest(text=PROMPT, params=greedy_pb(max_tokens)), timeout=30, metadata=md)


def complete(g: GatewayHandle, key: str, max_tokens: int = 8) -> Any:
    return client(g, key).completions.create(model=str(g.core.cfg.model), prompt=PROMPT, max_tokens=max_tokens,
                                             temperature=0, extra_body={"ignore_eos": True})


def rpc_error(fn: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value


# --- who gets in ---------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_valid_keys_work_over_http_and_grpc(gw: GatewayHandle, reference: Reference) -> None:
    ref = reference.greedy(PROMPT, 8)
    for key in (ALICE, BOB):
        assert complete(gw, key).choices[0].text == ref.text
        assert list(grpc_generate(gw, key).token_ids) == ref.token_ids
    stream = client(gw, ALICE).completions.create(model=str(gw.core.cfg.model), prompt=PROMPT, max_tokens=8,
                                                  temperature=0, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in stream if c.choices) == ref.text
    assert [m.id for m in client(gw, ALICE).models.list().data] == [gw.core.model_name]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("key", [None, EVE, ALICE[:-1], ALICE + "x", "alice:" + ALICE, ""])
def test_missing_or_wrong_keys_are_refused(gw: GatewayHandle, key: str | None,
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    body = {"model": str(gw.core.cfg.model), "prompt": PROMPT, "max_tokens": 4}
    for path, b in (("/v1/completions", body), ("/v1/chat/completions", {**body, "prompt": None}),
                    ("/v1/models", None), ("//v1/models", None), ("/v1/nothing", None)):
        status, headers, err = http(gw, path, key, b)
        assert status == 401, (path, status, err)
        assert headers["WWW-Authenticate"] == "Bearer"
        assert err["error"]["type"] == "authentication_error" and err["error"]["code"] == 401
        assert "API key" in err["error"]["message"]
    if key:
        with pytest.raises(openai.AuthenticationError):
            complete(gw, key)
    e = rpc_error(lambda: grpc_generate(gw, key))
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "API key" in (e.details() or "")
    md = (("authorization", f"Bearer {key}"),) if key else None
    with grpc.insecure_channel(f"127.0.0.1:{gw.port}") as ch:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        e = rpc_error(lambda: stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=5, metadata=md))
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED
        e = rpc_error(lambda: list(stub.Generate(gateway_pb2.GenerateRequest(text=PROMPT), timeout=5, metadata=md)))
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED
        # a bad request without a key learns nothing about what is wrong with it
        e = rpc_error(lambda: stub.GenerateUnary(gateway_pb2.GenerateRequest(), timeout=5, metadata=md))
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED
    if key:
        assert key not in caplog.text  # never logged


@pytest.mark.timeout(60)
def test_health_and_metrics_stay_open(gw: GatewayHandle) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    assert http(gw, "/health")[0] == 200
    status, _, text = http(gw, "/metrics")
    assert status == 200 and b"specsplit_requests_total" in text
    with grpc.insecure_channel(f"127.0.0.1:{gw.port}") as ch:
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING


@pytest.mark.timeout(60)
def test_a_revoked_key_is_refused_once_the_secret_changes(gw: GatewayHandle, keyfile: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    carol = "sk-carol-5555555555555555"
    assert len(grpc_generate(gw, ALICE).token_ids) == 8
    _swap_secret(keyfile.parent, f"{BOB}\ncarol:{carol}\n", 2)  # alice revoked, carol added
    for key in (ALICE,):
        with pytest.raises(openai.AuthenticationError):
            complete(gw, key)
        assert rpc_error(lambda k=key: grpc_generate(gw, k)).code() == grpc.StatusCode.UNAUTHENTICATED
    assert complete(gw, carol).usage.completion_tokens == 8
    assert len(grpc_generate(gw, BOB).token_ids) == 8
    assert "removed ['alice']" in caplog.text and "added ['carol']" in caplog.text
    # a broken update keeps the last good keys (and says so); a plain rewrite is picked up too
    write_atomically(keyfile.resolve(), "carol:\n")
    assert len(grpc_generate(gw, carol).token_ids) == 8
    assert "not reloaded" in caplog.text
    write_atomically(keyfile.resolve(), f"{BOB}\n")
    assert rpc_error(lambda: grpc_generate(gw, carol)).code() == grpc.StatusCode.UNAUTHENTICATED
    for key in (ALICE, BOB, carol):
        assert key not in caplog.text


# --- per-key limits ----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_per_key_concurrency_limit(secure: SecureCluster, tmp_path: Path) -> None:
    (tmp_path / "keys").write_text(f"alice:{ALICE} max_concurrent=1\nbob:{BOB}\n")
    g = secure.gateway(api_key_file=str(tmp_path / "keys"), api_key_max_concurrent=2)
    md = (("authorization", f"Bearer {ALICE}"),)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{g.port}") as ch:
            stub = gateway_pb2_grpc.GatewayStub(ch)
            long = stub.Generate(gateway_pb2.GenerateRequest(text=PROMPT, params=greedy_pb(400)), timeout=30,
                                 metadata=md)
            next(long)  # admitted and running
            e = rpc_error(lambda: grpc_generate(g, ALICE))
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "alice" in (e.details() or "")
            assert dict(e.trailing_metadata())["retry-after"] == "1"
            status, headers, err = http(g, "/v1/completions", ALICE,
                                        {"model": str(g.core.cfg.model), "prompt": PROMPT, "max_tokens": 4})
            assert status == 429 and headers["Retry-After"] == "1"
            assert err["error"]["type"] == "rate_limit_exceeded"
            with pytest.raises(openai.RateLimitError):
                complete(g, ALICE)
            assert len(grpc_generate(g, BOB).token_ids) == 8  # another key is not affected
            long.cancel()
        deadline = time.monotonic() + 10
        while True:  # the cancelled request gives its slot back
            try:
                assert len(grpc_generate(g, ALICE).token_ids) == 8
                break
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        secure.close_gateway(g)


@pytest.mark.timeout(60)
def test_per_key_tokens_per_minute(secure: SecureCluster, tmp_path: Path) -> None:
    (tmp_path / "keys").write_text(f"alice:{ALICE}\nbob:{BOB} tokens_per_minute=0\n")
    g = secure.gateway(api_key_file=str(tmp_path / "keys"), api_key_tokens_per_minute=20)
    try:
        assert len(grpc_generate(g, ALICE, max_tokens=20).token_ids) == 20  # prompt + 20 tokens: over budget
        e = rpc_error(lambda: grpc_generate(g, ALICE))
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "tokens per minute" in (e.details() or "")
        assert 1 <= int(dict(e.trailing_metadata())["retry-after"]) <= 60
        status, headers, err = http(g, "/v1/completions", ALICE,
                                    {"model": str(g.core.cfg.model), "prompt": PROMPT, "max_tokens": 4})
        assert status == 429 and 1 <= int(headers["Retry-After"]) <= 60 and "alice" in err["error"]["message"]
        with pytest.raises(openai.RateLimitError):
            complete(g, ALICE)
        for _ in range(3):  # bob's own line turns the limit off
            assert complete(g, BOB, max_tokens=16).usage.completion_tokens == 16
    finally:
        secure.close_gateway(g)
