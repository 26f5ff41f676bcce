"""TLS and mutual TLS: tiers that only the gateway (a client certificate of our CA) may use."""

from __future__ import annotations

import logging
import ssl
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specsplit.proto.v1 import gateway_pb2, gateway_pb2_grpc
from specsplit.serving.grpc_server import start_grpc_server
from specsplit.serving.tls import ClientTLS, ServerTLS, channel
from tests.security.conftest import SecureCluster, target_session
from tests.services.conftest import LoopThread, Reference, greedy_pb

openai = pytest.importorskip("openai")

SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.mark.timeout(60)
def test_generation_over_mutual_tls_matches_plain_decoding(secure: SecureCluster, reference: Reference) -> None:
    gw = secure.gateway()
    with grpc.insecure_channel(f"127.0.0.1:{gw.port}") as ch:
        out = gateway_pb2_grpc.GatewayStub(ch).GenerateUnary(
            gateway_pb2.GenerateRequest(text="the quick brown fox", params=greedy_pb(16)), timeout=30)
    assert list(out.token_ids) == reference.greedy("the quick brown fox", 16).token_ids
    assert not out.stats.draft_fallback and out.stats.rounds > 0  # both tiers were reached over mTLS


@pytest.mark.timeout(60)
def test_the_gateway_serves_its_public_ports_over_tls(secure: SecureCluster, reference: Reference) -> None:
    pub = secure.pki.gateway_public
    gw = secure.gateway(tls_cert=pub.cert, tls_key=pub.key)
    ref = reference.greedy("hello", 8)
    with channel(f"127.0.0.1:{gw.port}", ClientTLS(secure.pki.ca), []) as ch:
        out = gateway_pb2_grpc.GatewayStub(ch).GenerateUnary(
            gateway_pb2.GenerateRequest(text="hello", params=greedy_pb(8)), timeout=30)
    assert list(out.token_ids) == ref.token_ids
    with openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=secure.pki.ca)) as http:
        client = openai.OpenAI(base_url=f"https://127.0.0.1:{gw.http_port}/v1", api_key="unused", max_retries=0,
                               http_client=http)
        done = client.completions.create(model=str(secure.models.target), prompt="hello", max_tokens=8,
                                         temperature=0, extra_body={"ignore_eos": True})
    assert done.choices[0].text == ref.text
    with pytest.raises(grpc.RpcError) as e, grpc.insecure_channel(f"127.0.0.1:{gw.port}") as ch:
        gateway_pb2_grpc.GatewayStub(ch).ListModels(gateway_pb2.ListModelsRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # a plaintext client cannot talk to it
    secure.close_gateway(gw)


@pytest.mark.timeout(60)
def test_the_gateway_can_require_client_certificates_too(secure: SecureCluster) -> None:
    p = secure.pki
    gw = secure.gateway(tls_cert=p.gateway_public.cert, tls_key=p.gateway_public.key, tls_client_ca=p.ca)
    req = gateway_pb2.GenerateRequest(text="hello", params=greedy_pb(4))
    with channel(f"127.0.0.1:{gw.port}", p.client(p.gateway_client), []) as ch:
        assert len(gateway_pb2_grpc.GatewayStub(ch).GenerateUnary(req, timeout=30).token_ids) == 4
    for tls in (p.client(), p.client(p.rogue_client)):
        with channel(f"127.0.0.1:{gw.port}", tls, []) as ch, pytest.raises(grpc.RpcError) as e:
            gateway_pb2_grpc.GatewayStub(ch).GenerateUnary(req, timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    ctx = ssl.create_default_context(cafile=p.ca)
    with openai.DefaultHttpxClient(verify=ctx) as http:
        client = openai.OpenAI(base_url=f"https://127.0.0.1:{gw.http_port}/v1", api_key="unused", max_retries=0,
                               http_client=http)
        with pytest.raises(openai.APIConnectionError):
            client.models.list()
    ctx.load_cert_chain(p.gateway_client.cert, p.gateway_client.key)
    with openai.DefaultHttpxClient(verify=ctx) as http:
        client = openai.OpenAI(base_url=f"https://127.0.0.1:{gw.http_port}/v1", api_key="unused", max_retries=0,
                               http_client=http)
        assert [m.id for m in client.models.list().data] == [gw.core.model_name]
    secure.close_gateway(gw)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("client", ["rogue_ca", "no_certificate", "plaintext", "untrusted_server"])
def test_a_tier_refuses_clients_without_a_certificate_of_its_ca(secure: SecureCluster, client: str) -> None:
    p = secure.pki
    address = secure.target_address
    if client == "plaintext":
        ch = grpc.insecure_channel(address)
    else:
        tls = {"rogue_ca": p.client(p.rogue_client), "no_certificate": p.client(),
               "untrusted_server": ClientTLS(p.rogue_ca, p.gateway_client.cert, p.gateway_client.key)}[client]
        ch = channel(address, tls, [])
    opened = secure.target.metrics.sessions_opened._value.get()
    with ch, pytest.raises(grpc.RpcError) as e:
        target_session(ch)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
    assert secure.target.metrics.sessions_opened._value.get() == opened  # nothing reached the servicer
    with secure.target_channel() as ok:  # the gateway's certificate still works
        assert len(target_session(ok)) == 4


@pytest.mark.timeout(60)
def test_a_gateway_with_a_rogue_certificate_gets_unavailable(secure: SecureCluster) -> None:
    rogue = secure.pki.rogue_client
    gw = secure.gateway(tier_tls_cert=rogue.cert, tier_tls_key=rogue.key, request_timeout_s=10)
    with grpc.insecure_channel(f"127.0.0.1:{gw.port}") as ch, pytest.raises(grpc.RpcError) as e:
        gateway_pb2_grpc.GatewayStub(ch).GenerateUnary(
            gateway_pb2.GenerateRequest(text="hello", params=greedy_pb(4)), timeout=30)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
    secure.close_gateway(gw)


@pytest.mark.timeout(30)
def test_kubelet_health_port_is_plaintext_and_serves_only_health(secure: SecureCluster) -> None:
    port = secure.target.grpc.health_port
    assert port and port != secure.target.port
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
        with pytest.raises(grpc.RpcError) as e:
            target_session(ch)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with secure.target_channel() as ch:  # the TLS port answers health too
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING


@pytest.mark.timeout(30)
def test_plaintext_says_so_in_the_log(aio: LoopThread, secure: SecureCluster, caplog: pytest.LogCaptureFixture
                                      ) -> None:
    caplog.set_level(logging.INFO)
    srv = aio.run(start_grpc_server(lambda s: None, [], host="127.0.0.1", port=0))
    aio.run(srv.shutdown(0))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "PLAINTEXT" in r.getMessage()]
    assert len(warnings) == 1 and f"127.0.0.1:{srv.port}" in warnings[0].getMessage()
    caplog.clear()
    p = secure.pki
    srv = aio.run(start_grpc_server(lambda s: None, [], host="127.0.0.1", port=0,
                                    tls=ServerTLS(p.tier.cert, p.tier.key, p.ca)))
    aio.run(srv.shutdown(0))
    assert not [r for r in caplog.records if "PLAINTEXT" in r.getMessage()]
    assert any("requires client certificates" in r.getMessage() for r in caplog.records)
    caplog.clear()
    gw = secure.gateway(tier_tls_ca=None, tier_tls_cert=None, tier_tls_key=None)  # plaintext to the tiers
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("tiers are PLAINTEXT" in m for m in messages)
    assert any("HTTP on" in m and "PLAINTEXT" in m for m in messages)
    assert any("no --api-key-file" in m for m in messages)
    secure.close_gateway(gw)


@pytest.mark.parametrize("kw, word", [
    ({"cert": "a.crt", "key": None}, "go together"),
    ({"cert": None, "key": None, "client_ca": "ca.crt"}, "needs --tls-cert"),
])
def test_half_a_tls_configuration_is_an_error(kw: dict[str, Any], word: str) -> None:
    with pytest.raises(ValueError, match=word):
        ServerTLS.from_flags(**kw)
    assert ServerTLS.from_flags(None, None) is None


def test_unreadable_certificates_name_the_file(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="missing.key"):
        ServerTLS(str(tmp_path / "missing.crt"), str(tmp_path / "missing.key")).grpc_credentials()


def test_tier_server_name_defaults_to_the_service_dns_name() -> None:
    from gateway.config import GatewayConfig

    cfg = GatewayConfig("m", discovery="dns", target_service="sp-target", draft_service="sp-draft",
                        namespace="llm", tier_tls_ca="ca.crt")
    assert cfg.tier_tls("target").server_name == "sp-target.llm.svc"  # type: ignore[union-attr]
    assert cfg.tier_tls("draft").server_name == "sp-draft.llm.svc"  # type: ignore[union-attr]
    static = GatewayConfig("m", target_addresses=("10.0.0.1:50052",), tier_tls_ca="ca.crt",
                           tier_tls_server_name="tiers.test")
    assert static.tier_tls("target").server_name == "tiers.test"  # type: ignore[union-attr]
    assert GatewayConfig("m", target_addresses=("h:1",)).tier_tls("target") is None


def test_cli_flags_and_their_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    from specsplit.cli import build_parser

    monkeypatch.setenv("SPECSPLIT_TLS_CERT", "/tls/tls.crt")
    monkeypatch.setenv("SPECSPLIT_TIER_TLS_CA", "/tier/ca.crt")
    monkeypatch.setenv("SPECSPLIT_API_KEY_TOKENS_PER_MINUTE", "500")
    for tier in ("target", "draft"):
        a = build_parser().parse_args([tier, "m", "--tls-key", "/tls/tls.key", "--tls-client-ca", "/tls/ca.crt",
                                       "--health-port", "8081"])
        assert (a.tls_cert, a.tls_key, a.tls_client_ca, a.health_port) == \
            ("/tls/tls.crt", "/tls/tls.key", "/tls/ca.crt", 8081)
    a = build_parser().parse_args(["gateway", "m", "--api-key-file", "/keys/api-keys", "--tier-tls-cert", "c",
                                   "--tier-tls-key", "k", "--max-prompt-tokens", "100"])
    assert (a.api_key_file, a.api_key_tokens_per_minute, a.api_key_max_concurrent) == ("/keys/api-keys", 500, 0)
    assert (a.tier_tls_ca, a.tier_tls_cert, a.tier_tls_key, a.tls_cert) == ("/tier/ca.crt", "c", "k", "/tls/tls.crt")
    assert a.max_prompt_tokens == 100 and a.max_tokens_limit == 8192
    a = build_parser().parse_args(["generate", "hi", "--api-key", "sk-1", "--tls-ca", "ca.crt"])
    assert (a.api_key, a.tls_ca) == ("sk-1", "ca.crt")
