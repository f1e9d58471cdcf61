"""Channels to the Agent API: TLS verified against the trust bundle, or a pinned
first-use (TOFU) channel for an agent that has no bundle yet.

grpcio's Python client verifies the server's chain against the roots given and the
host name against DNS / IP SANs only (no SPIFFE ID check, no verify callback).  So
the server's X.509-SVID also carries a DNS name (``agent_api.dns_name`` on the
server, ``custos-server`` by default) that the CA refuses in any workload
certificate, and the channel checks the server against exactly that name through
``grpc.ssl_target_name_override`` (issue 8, "Agent API").
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.serialization import Encoding

from custos.agent.client.errors import AgentApiError
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


def channel_options(server_name: str) -> list[tuple[str, Any]]:
    """The options of every Agent API channel: the name checked in the server's
    certificate (and sent as ``:authority``) and the message size limits."""
    if not isinstance(server_name, str) or not server_name or not server_name.isascii():
        raise AgentApiError(
            "server_name must be the server certificate's DNS name",
            status=grpc.StatusCode.INVALID_ARGUMENT,
            code="agent_api_server_name",
        )
    return [
        ("grpc.ssl_target_name_override", server_name),
        ("grpc.default_authority", server_name),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]


def _pem(certificates: tuple[x509.Certificate, ...]) -> bytes:
    return b"".join(c.public_bytes(Encoding.PEM) for c in certificates)


def open_channel(address: str, *, bundle: TrustBundle, server_name: str) -> grpc.aio.Channel:
    """A channel to the Agent API at ``address`` (``host:port``) that trusts only the
    X.509 authorities of ``bundle`` and expects ``server_name`` in the server's
    certificate.  Call it inside the event loop that uses the channel."""
    if not isinstance(bundle, TrustBundle) or not bundle.x509_authorities:
        raise AgentApiError(
            "the trust bundle has no X.509 authorities to verify the server with",
            status=grpc.StatusCode.UNAUTHENTICATED,
            code="agent_api_no_roots",
        )
    credentials = grpc.ssl_channel_credentials(root_certificates=_pem(bundle.x509_authorities))
    return grpc.aio.secure_channel(address, credentials, options=channel_options(server_name))


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise AgentApiError(
            f"the server address must be host:port, not {address!r:.80}",
            status=grpc.StatusCode.INVALID_ARGUMENT,
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
            status=grpc.StatusCode.UNAVAILABLE,
        ) from e
    return certificate


async def open_insecure_bootstrap_channel(
    address: str, *, server_name: str, timeout: float = BOOTSTRAP_TIMEOUT
) -> grpc.aio.Channel:
    """A channel that trusts whatever certificate the server shows right now.

    For a first attestation without a bundle (SPIRE's ``insecure_bootstrap``; for
    development only): grpcio cannot open TLS without verifying the server, so the
    server's current certificate is fetched once (in a worker thread) and pinned as
    the only trust anchor (grpcio accepts a pinned leaf).  Anyone on the path at that
    moment can pose as the server: use it for the first attestation only, then
    :func:`open_channel` with the bundle the attestation returned.  Logs a warning.

    A coroutine (unlike :func:`open_channel`): the fetch is network I/O, and the
    channel must be made in the event loop that uses it.
    """
    options = channel_options(server_name)
    certificate = await asyncio.to_thread(fetch_server_certificate, address, timeout=timeout)
    return open_pinned_channel(address, certificate, options)


def open_pinned_channel(
    address: str, certificate: x509.Certificate, options: list[tuple[str, Any]]
) -> grpc.aio.Channel:
    """A channel whose only trust anchor is ``certificate`` (the TOFU pin), logged loudly."""
    log.warning(
        "INSECURE BOOTSTRAP: trusting the certificate %s presents now (SHA-256 %s) without "
        "verifying it; anyone between this agent and the server can impersonate the server. "
        "Configure a trust bundle for production.",
        address,
        certificate.fingerprint(SHA256()).hex(),
    )
    credentials = grpc.ssl_channel_credentials(root_certificates=_pem((certificate,)))
    return grpc.aio.secure_channel(address, credentials, options=options)


__all__ = [
    "BOOTSTRAP_TIMEOUT",
    "DEFAULT_SERVER_NAME",
    "MAX_MESSAGE_BYTES",
    "channel_options",
    "fetch_server_certificate",
    "open_channel",
    "open_insecure_bootstrap_channel",
    "open_pinned_channel",
]
