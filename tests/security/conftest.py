"""Fixtures for the security tests: a throwaway PKI and tiers that require mutual TLS.

Certificates are made at test time with `cryptography` (nothing secret is committed): a good
CA that signs the tiers' server certificate, the gateway's client certificate and the
gateway's public certificate, and an unrelated CA whose client certificate must be refused.
The servers run in-process on the services tests' background loop (`aio`), on 127.0.0.1.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from draft_service.config import DraftServiceConfig
from draft_service.server import start_draft
from gateway.config import GatewayConfig
from gateway.server import GatewayHandle, start_gateway
from specsplit.proto.v1 import target_pb2, target_pb2_grpc
from specsplit.serving.tier import TierHandle
from specsplit.serving.tls import ClientTLS, channel
from target_service.config import TargetServiceConfig
from target_service.server import start_target
from tests.services import conftest as services
from tests.services.conftest import KV_BYTES, LoopThread, TinyModels, greedy_choice_pb, spec_config

# the services tests' fixtures, re-registered for this package (its own instances)
aio = services.aio
models = services.models
reference = services.reference
_one_torch_thread = services._one_torch_thread

# --- a throwaway PKI -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cert:
    cert: str  # PEM file paths
    key: str


def _name(cn: str) -> Any:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, cert: Any, key: Any) -> Cert:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    os.chmod(path.with_suffix(".key"), 0o600)
    return Cert(str(path.with_suffix(".crt")), str(path.with_suffix(".key")))


class CA:
    def __init__(self, folder: Path, cn: str) -> None:
        self.folder = folder
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.pem = folder / f"{cn}-ca.crt"
        self.pem.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, cn: str, *, server: bool = False, client: bool = False,
              dns: tuple[str, ...] = ("localhost",), ips: tuple[str, ...] = ("127.0.0.1",)) -> Cert:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
        sans = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(self.cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .sign(self.key, hashes.SHA256()))
        return _write(self.folder / cn, cert, key)


@dataclass(frozen=True)
class Pki:
    ca: str  # the CA every good certificate chains to
    tier: Cert  # draft and target servers (SANs: localhost, 127.0.0.1, specsplit-tiers.test)
    gateway_client: Cert  # what the gateway presents to the tiers
    gateway_public: Cert  # the gateway's own HTTPS / gRPC-TLS endpoint
    rogue_ca: str  # an unrelated CA
    rogue_client: Cert  # a client certificate that CA signed

    def client(self, cert: Cert | None = None, server_name: str | None = None) -> ClientTLS:
        return ClientTLS(self.ca, cert.cert if cert else None, cert.key if cert else None, server_name)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    good, rogue = CA(folder, "specsplit-test"), CA(folder, "rogue")
    return Pki(
        str(good.pem),
        good.issue("tier", server=True, dns=("localhost", "specsplit-tiers.test")),
        good.issue("gateway-client", client=True, dns=("gateway",), ips=()),
        good.issue("gateway-public", server=True),
        str(rogue.pem),
        rogue.issue("rogue-client", client=True, dns=("gateway",), ips=()),
    )


# --- tiers that require mutual TLS ----------------------------------------------------------------


@dataclass
class SecureCluster:
    """A target and an n-gram draft tier that require client certificates of the test CA."""

    aio: LoopThread
    models: TinyModels
    pki: Pki
    target: TierHandle
    draft: TierHandle
    _gateways: list[GatewayHandle] = field(default_factory=list)

    @property
    def target_address(self) -> str:
        return f"127.0.0.1:{self.target.port}"

    def gateway(self, draft_address: str | None = None, **cfg: Any) -> GatewayHandle:
        """A new gateway dialling the tiers with the gateway's client certificate (mTLS)."""
        p = self.pki
        kw: dict[str, Any] = {"tier_tls_ca": p.ca, "tier_tls_cert": p.gateway_client.cert,
                              "tier_tls_key": p.gateway_client.key, **cfg}
        g = self.aio.run(start_gateway(GatewayConfig(
            str(self.models.target), spec_config("ngram", self.models), host="127.0.0.1", port=0, grpc_port=0,
            target_addresses=(self.target_address,),
            draft_addresses=(draft_address or f"127.0.0.1:{self.draft.port}",), **kw)))
        self._gateways.append(g)
        return g

    def close_gateway(self, g: GatewayHandle) -> None:
        self._gateways.remove(g)
        self.aio.run(g.shutdown(0.5))

    def target_channel(self, client: Cert | None = None) -> grpc.Channel:
        return channel(self.target_address, self.pki.client(client or self.pki.gateway_client), [])


@pytest.fixture(scope="package")
def secure(aio: LoopThread, models: TinyModels, pki: Pki) -> Iterator[SecureCluster]:
    tls = {"tls_cert": pki.tier.cert, "tls_key": pki.tier.key, "tls_client_ca": pki.ca, "health_port": 0}
    # in the direct round the target tier dials the draft tier itself, as a client of its mTLS
    target = aio.run(start_target(TargetServiceConfig(
        str(models.target), host="127.0.0.1", grpc_port=0, metrics_port=0, kv_cache_memory_bytes=KV_BYTES,
        draft_tls_ca=pki.ca, draft_tls_cert=pki.gateway_client.cert, draft_tls_key=pki.gateway_client.key, **tls)))
    draft = aio.run(start_draft(DraftServiceConfig(
        str(models.target), spec_config("ngram", models), host="127.0.0.1", grpc_port=0, metrics_port=0,
        kv_cache_memory_bytes=KV_BYTES, **tls)))
    c = SecureCluster(aio, models, pki, target, draft)
    yield c
    for g in list(c._gateways):
        aio.run(g.shutdown(0.5))
    for t in (target, draft):
        aio.run(t.shutdown(0.5))


def write_atomically(path: Path, text: str) -> None:
    """Replace a file the way a Secret volume update does: a new inode renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def target_session(ch: grpc.Channel, n: int = 4, prompt: tuple[int, ...] = (1, 2, 3),
                   blocks: list[list[int]] | None = None) -> list[int]:
    """A session straight on the target: open, then one verify per block (n plain steps by default)."""
    blocks = [[] for _ in range(n)] if blocks is None else blocks
    msgs = [target_pb2.TargetClientMessage(open=target_pb2.TargetOpen(token_ids=list(prompt), params=greedy_choice_pb()))]
    msgs += [target_pb2.TargetClientMessage(verify=target_pb2.TargetVerify(round_id=i, draft_ids=b))
             for i, b in enumerate(blocks)]
    out = target_pb2_grpc.TargetServiceStub(ch).Session(iter(msgs), timeout=10)
    return [m.result.next_token for m in out]
