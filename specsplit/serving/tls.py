"""TLS and mutual TLS for every gRPC (and the gateway's HTTP) endpoint, loaded from PEM files.

One place builds credentials so that servers, the gateway's tier channels and clients agree:

- a server with a certificate and key serves TLS; with a client CA as well it *requires* a
  client certificate signed by that CA (mutual TLS: only the gateway may open tier sessions);
- a client trusts the given CA (or the system roots) and presents its own certificate when
  one is given. Replicas are dialled by pod IP, so `server_name` names the DNS name their
  certificate carries (e.g. the headless Service `specsplit-target.llm.svc`).

Without a certificate everything stays plaintext, as local runs want, and says so in the log.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read the {what} {path!r}: {e.strerror or e}") from None


@dataclass(frozen=True)
class ServerTLS:
    """A server's certificate chain and key (PEM files); `client_ca` turns on mutual TLS."""

    cert: str
    key: str
    client_ca: str | None = None

    @staticmethod
    def from_flags(cert: str | None, key: str | None, client_ca: str | None = None) -> ServerTLS | None:
        """None (plaintext) when no certificate is given; a half-given pair is an error."""
        if not cert and not key:
            if client_ca:
                raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
            return None
        if not cert or not key:
            raise ValueError("--tls-cert and --tls-key go together")
        return ServerTLS(cert, key, client_ca or None)

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def grpc_credentials(self) -> grpc.ServerCredentials:
        ca = _read(self.client_ca, "TLS client CA") if self.client_ca else None
        return grpc.ssl_server_credentials(
            [(_read(self.key, "TLS key"), _read(self.cert, "TLS certificate"))],
            root_certificates=ca, require_client_auth=ca is not None)

    def ssl_context(self) -> ssl.SSLContext:
        """For the gateway's HTTP server (aiohttp)."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert, self.key)
            if self.client_ca:
                ctx.load_verify_locations(self.client_ca)
                ctx.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"cannot load the TLS certificate/key/CA: {e}") from None
        return ctx


@dataclass(frozen=True)
class ClientTLS:
    """What a client needs: the CA to trust, optionally its own certificate, the name to verify."""

    ca: str | None = None  # None: the system's root certificates
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None  # verify the server's certificate against this name

    @staticmethod
    def from_flags(ca: str | None, cert: str | None = None, key: str | None = None,
                   server_name: str | None = None) -> ClientTLS | None:
        """None (plaintext) when nothing is given; a client certificate needs its key."""
        if not (ca or cert or key):
            return None
        if bool(cert) != bool(key):
            raise ValueError("--tier-tls-cert and --tier-tls-key go together")
        return ClientTLS(ca or None, cert or None, key or None, server_name or None)

    def grpc_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "TLS CA") if self.ca else None,
            private_key=_read(self.key, "TLS client key") if self.key else None,
            certificate_chain=_read(self.cert, "TLS client certificate") if self.cert else None)

    def grpc_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def add_port(server: grpc.aio.Server, host: str, port: int, tls: ServerTLS | None, what: str = "gRPC") -> int:
    """Bind host:port with TLS when given; plaintext otherwise, with a warning that says so."""
    if tls is None:
        bound = server.add_insecure_port(f"{host}:{port}")
        log.warning("%s on %s:%d is PLAINTEXT (no TLS, no client authentication): use only on a trusted "
                    "network; --tls-cert/--tls-key (and --tls-client-ca for mutual TLS) encrypt it", what, host, bound)
    else:
        bound = server.add_secure_port(f"{host}:{port}", tls.grpc_credentials())
        log.info("%s on %s:%d uses TLS%s", what, host, bound, " and requires client certificates" if tls.mutual else "")
    return bound


def aio_channel(address: str, tls: ClientTLS | None, options: Sequence[tuple[str, Any]]) -> grpc.aio.Channel:
    """An asyncio channel to `address`: secure with `tls`, plaintext without."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, tls.grpc_credentials(), options=[*options, *tls.grpc_options()])


def channel(address: str, tls: ClientTLS | None, options: Sequence[tuple[str, Any]]) -> grpc.Channel:
    """A blocking channel (clients, health checks), secure with `tls`."""
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, tls.grpc_credentials(), options=[*options, *tls.grpc_options()])
