"""The Agent API's TLS credential: an X.509-SVID for ``spiffe://<td>/custos/server``
plus the DNS SAN ``agent_api.dns_name``, for a fresh software key held only in memory.

grpcio's Python client checks DNS and IP SANs only (no verify callback), so agents
connect with the bundle's X.509 roots and ``grpc.ssl_target_name_override`` set to
that DNS name.  The CA key stays in its device; the TLS key is a software key because
grpcio cannot use a key it cannot read (issue 8, "Agent API").

The certificate is renewed at half its lifetime, and at once when the signing CA
changes; grpcio's dynamic server credentials pick the new one up at the next
handshake, so the port never closes (decision 0040).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from custos.identity import SpiffeId
from custos.x509.ca import CertificateAuthority

log = logging.getLogger(__name__)

#: The server certificate's lifetime (clamped to the CA's); renewed at half of it.
SERVER_SVID_TTL = timedelta(hours=1)


@dataclass(frozen=True)
class ServerCertificate:
    """One server certificate: PEM chain (leaf first), PEM key, validity, signer."""

    chain_pem: bytes
    key_pem: bytes = field(repr=False)
    not_before: datetime
    not_after: datetime
    ca_fingerprint: bytes

    def renew_at(self) -> datetime:
        """Half way through the lifetime (SPIRE renews its server SVID the same way)."""
        return self.not_before + (self.not_after - self.not_before) / 2


def make_server_certificate(
    ca: CertificateAuthority,
    spiffe_id: SpiffeId,
    dns_name: str,
    *,
    ttl: timedelta = SERVER_SVID_TTL,
    now: datetime | None = None,
) -> ServerCertificate:
    """A fresh P-256 key and its server SVID signed by *ca* (chain up to, not
    including, the root)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    svid = ca.sign_x509_svid(
        csr.public_bytes(serialization.Encoding.DER), spiffe_id, ttl, [dns_name], now=now
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    leaf = svid.leaf
    return ServerCertificate(
        chain_pem=svid.to_pem(),
        key_pem=key_pem,
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        ca_fingerprint=ca.certificate.fingerprint(hashes.SHA256()),
    )


class ServerTls:
    """The Agent API's server credentials, renewable while the port stays open.

    grpcio calls the fetcher from its own threads at each handshake; it only hands
    over a certificate made beforehand by :meth:`update` (no signing on that path).
    """

    def __init__(self, first: ServerCertificate) -> None:
        self._lock = threading.Lock()
        self._current = first
        self._pending: ServerCertificate | None = None

    @property
    def current(self) -> ServerCertificate:
        with self._lock:
            return self._pending or self._current

    def update(self, cert: ServerCertificate) -> None:
        """Serve *cert* from the next handshake on."""
        with self._lock:
            self._pending = cert
        log.info("Agent API TLS certificate renewed, valid until %s", cert.not_after.isoformat())

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            _configuration(self._current), self._fetch, require_client_authentication=False
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            pending, self._pending = self._pending, None
            if pending is None:
                return None  # keep the current one
            self._current = pending
        return _configuration(pending)


def _configuration(cert: ServerCertificate) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(cert.key_pem, cert.chain_pem)])


__all__ = ["SERVER_SVID_TTL", "ServerCertificate", "ServerTls", "make_server_certificate"]
