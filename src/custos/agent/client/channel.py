"""Channels to the Agent API: TLS verified against the trust bundle, or a pinned
first-use (TOFU) channel for an agent that has no bundle yet.

The agent's client runs on grpclib (decision 0126: one gRPC stack in the agent, no
grpcio and its ~13 MiB C core).  The TLS context trusts exactly the roots given (no
system store) and checks the server's certificate against one DNS name: the server's
X.509-SVID also carries a DNS name (``agent_api.dns_name`` on the server,
``custos-server`` by default) that the CA refuses in any workload certificate, and
the channel checks the server against exactly that name whatever host the address
names (often ``127.0.0.1``), through grpclib's ``ssl_target_name_override`` (the
TLS ``server_hostname``: SNI and the name checked).  The same name is the HTTP/2
``:authority`` (issue 8, "Agent API").
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.serialization import Encoding
from google.protobuf.message import DecodeError
from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.const import Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError

from custos.agent.client.errors import AgentApiError, InvalidServerResponseError
from custos.bundle import TrustBundle
from custos.x509 import CertificateFormatError, load_certificates

log = logging.getLogger(__name__)

#: The largest message either side sends: a batch of X.509-SVIDs, an entry set of
#: thousands of entries (the server sets the same limit).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
#: The server's DNS name in its certificate when its configuration does not say otherwise.
DEFAULT_SERVER_NAME = "custos-server"
#: How long the TOFU fetch of the server's certificate may take.
BOOTSTRAP_TIMEOUT = 10.0
#: TLS 1.2 suites (TLS 1.3 has only AEAD suites): forward secret AEAD only.
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


class ChannelOptions:
    """What every Agent API channel sets: the name checked in the server's certificate
    (and sent as ``:authority``) and the message size limit."""

    def __init__(self, server_name: str) -> None:
        if not isinstance(server_name, str) or not server_name or not server_name.isascii():
            raise AgentApiError(
                "server_name must be the server certificate's DNS name",
                status=Status.INVALID_ARGUMENT,
                code="agent_api_server_name",
            )
        self.server_name = server_name
        self.max_message_bytes = MAX_MESSAGE_BYTES


def channel_options(server_name: str) -> ChannelOptions:
    """The options of every Agent API channel (checks ``server_name``)."""
    return ChannelOptions(server_name)


class LimitedCodec(ProtoCodec):
    """Protobuf with the message size limit (grpclib 0.4 has no max_message_size):
    an oversized message either way is ``RESOURCE_EXHAUSTED``, as grpcio's limits were;
    bytes from the server that do not parse are an :class:`InvalidServerResponseError`."""

    def __init__(self, limit: int = MAX_MESSAGE_BYTES) -> None:
        self._limit = limit

    def encode(self, message: Any, message_type: Any) -> bytes:
        data: bytes = super().encode(message, message_type)
        if len(data) > self._limit:
            raise GRPCError(
                Status.RESOURCE_EXHAUSTED,
                f"a {len(data)}-byte message is over the limit ({self._limit} bytes)",
            )
        return data

    def decode(self, data: bytes, message_type: Any) -> Any:
        if len(data) > self._limit:
            raise GRPCError(
                Status.RESOURCE_EXHAUSTED,
                f"the server sent a {len(data)}-byte message, over the limit "
                f"({self._limit} bytes)",
            )
        try:
            return super().decode(data, message_type)
        except DecodeError:
            raise InvalidServerResponseError(
                f"the server sent a message that does not parse as "
                f"{message_type.DESCRIPTOR.name}"
            ) from None


def _pem(certificates: tuple[x509.Certificate, ...]) -> str:
    return b"".join(c.public_bytes(Encoding.PEM) for c in certificates).decode("ascii")


def tls_context(certificates: tuple[x509.Certificate, ...]) -> ssl.SSLContext:
    """A client TLS context that trusts ``certificates`` only (no system roots) and
    checks the server's host name; a trusted certificate may be an intermediate or
    the server's own leaf (the TOFU pin), as grpcio allowed (partial chains)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(_TLS12_CIPHERS)
    context.set_alpn_protocols(["h2"])
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.load_verify_locations(cadata=_pem(certificates))
    return context


def _secure_channel(
    address: str, certificates: tuple[x509.Certificate, ...], options: ChannelOptions
) -> Channel:
    host, port = _split_address(address)
    channel = Channel(
        host,
        port,
        ssl=tls_context(certificates),
        codec=LimitedCodec(options.max_message_bytes),
        config=Configuration(ssl_target_name_override=options.server_name),
    )
    # :authority stays grpclib's host:port: the server checks the TLS name (above), not
    # :authority, and grpclib has no public setting for it.
    return channel


def open_channel(address: str, *, bundle: TrustBundle, server_name: str) -> Channel:
    """A channel to the Agent API at ``address`` (``host:port``) that trusts only the
    X.509 authorities of ``bundle`` and expects ``server_name`` in the server's
    certificate.  Call it inside the event loop that uses the channel; close it with
    ``channel.close()`` (or ``async with``)."""
    options = channel_options(server_name)
    if not isinstance(bundle, TrustBundle) or not bundle.x509_authorities:
        raise AgentApiError(
            "the trust bundle has no X.509 authorities to verify the server with",
            status=Status.UNAUTHENTICATED,
            code="agent_api_no_roots",
        )
    return _secure_channel(address, tuple(bundle.x509_authorities), options)


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise AgentApiError(
            f"the server address must be host:port, not {address!r:.80}",
            status=Status.INVALID_ARGUMENT,
            code="agent_api_address",
        )
    return host, int(port)


def fetch_server_certificate(
    address: str, *, timeout: float = BOOTSTRAP_TIMEOUT
) -> x509.Certificate:
    """The certificate the server at ``address`` presents, unverified (TOFU)."""
    host, port = _split_address(address)
    try:
        pem = ssl.get_server_certificate((host, port), timeout=timeout)
        [certificate, *_] = load_certificates(pem.encode("ascii"), what="server certificate")
    except (OSError, ValueError, CertificateFormatError) as e:
        raise AgentApiError(
            f"could not fetch the server's certificate from {address}: {e}",
            status=Status.UNAVAILABLE,
        ) from e
    return certificate


async def open_insecure_bootstrap_channel(
    address: str, *, server_name: str, timeout: float = BOOTSTRAP_TIMEOUT
) -> Channel:
    """A channel that trusts whatever certificate the server shows right now.

    For a first attestation without a bundle (SPIRE's ``insecure_bootstrap``; for
    development only): the server's current certificate is fetched once (in a worker
    thread) and pinned as the only trust anchor (a partial chain: the leaf itself).
    The name is still checked.  Anyone on the path at that moment can pose as the
    server: use it for the first attestation only, then :func:`open_channel` with
    the bundle the attestation returned.  Logs a warning.

    A coroutine (unlike :func:`open_channel`): the fetch is network I/O, and the
    channel must be made in the event loop that uses it.
    """
    options = channel_options(server_name)
    certificate = await asyncio.to_thread(fetch_server_certificate, address, timeout=timeout)
    return open_pinned_channel(address, certificate, options)


def open_pinned_channel(
    address: str, certificate: x509.Certificate, options: ChannelOptions
) -> Channel:
    """A channel whose only trust anchor is ``certificate`` (the TOFU pin), logged loudly."""
    log.warning(
        "INSECURE BOOTSTRAP: trusting the certificate %s presents now (SHA-256 %s) without "
        "verifying it; anyone between this agent and the server can impersonate the server. "
        "Configure a trust bundle for production.",
        address,
        certificate.fingerprint(SHA256()).hex(),
    )
    return _secure_channel(address, (certificate,), options)


__all__ = [
    "BOOTSTRAP_TIMEOUT",
    "DEFAULT_SERVER_NAME",
    "MAX_MESSAGE_BYTES",
    "ChannelOptions",
    "LimitedCodec",
    "channel_options",
    "fetch_server_certificate",
    "open_channel",
    "open_insecure_bootstrap_channel",
    "open_pinned_channel",
    "tls_context",
]
