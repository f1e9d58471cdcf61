"""A throwaway CA and a server certificate for 127.0.0.1 / localhost (no pytest import).

Why this module: every local HTTPS stand-in (the fake kube-apiserver, the fake kubelet,
the fake Google JWKS endpoint) and the federation endpoint's tests need the same thing,
a private CA the client is told to trust and a serving certificate it issued for the
loopback address, and each used to build its own copy.  :func:`local_tls` is that one
copy; the fakes' ``make_tls`` / ``local_tls`` / ``make_ca_and_server_cert`` call it.

The certificates are shaped so that a strict verifier accepts them (Python's
``ssl``, urllib3 under the ``kubernetes`` client): the CA has ``basicConstraints``
``CA:true, pathlen:0``, ``keyCertSign``/``cRLSign`` and a subject key identifier; the
server certificate has ``CA:false``, ``subjectAltName`` ``DNS:localhost,
IP:127.0.0.1``, ``serverAuth`` and an authority key identifier.  P-256 keys, valid from
an hour ago for a day.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class LocalTls:
    """The files :func:`local_tls` wrote: the CA to trust, the server's chain and key."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        """A TLS server context serving this certificate (no client certificate asked)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def local_tls(
    directory: Path | None = None,
    *,
    ca_name: str = "custos test CA",
    server_name: str = "127.0.0.1",
) -> LocalTls:
    """Make a CA (``ca.pem``) and a server certificate it issued for 127.0.0.1 and
    localhost (``server.pem``, key ``server.key``) in ``directory`` (created if
    missing; a new temporary directory if None)."""
    if directory is None:
        directory = Path(tempfile.mkdtemp(prefix="custos-tls-"))
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    key = ec.generate_private_key(ec.SECP256R1())

    def builder(subject: str, public: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(_name(subject))
            .issuer_name(_name(ca_name))
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    ca = (
        builder(ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        builder(server_name, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    tls = LocalTls(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    tls.ca_file.write_bytes(ca.public_bytes(pem))
    tls.cert_file.write_bytes(leaf.public_bytes(pem))
    tls.key_file.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return tls


__all__ = ["LocalTls", "local_tls"]
