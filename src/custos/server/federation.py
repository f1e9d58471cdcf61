"""The SPIFFE federation bundle endpoint, ``https_web`` profile.

SPIFFE Trust Domain and Bundle spec, section 5: a peer trust domain fetches this
trust domain's bundle as SPIFFE bundle JSON over HTTPS, authenticating the endpoint
with ordinary web PKI (the operator's certificate, not an SVID).  SPIRE serves it at
``/``; so does custos.  ``spiffe_refresh_hint`` says how often peers should poll.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import replace

from custos._files import UnreadableFileError, read_small_file
from custos.bundle import TrustBundle
from custos.errors import CustosError
from custos.server.config import FederationConfig
from custos.server.datastore import DatastoreUnavailableError
from custos.server.http import HttpListener, Response

BUNDLE_CONTENT_TYPE = "application/json"
#: A certificate chain or key file is a few KiB.
MAX_PEM_BYTES = 256 * 1024

log = logging.getLogger(__name__)


class FederationConfigError(CustosError):
    """The federation endpoint's certificate or key cannot be loaded."""

    code = "federation_config"


def tls_context(config: FederationConfig) -> ssl.SSLContext:
    """A TLS server context for the operator's web-PKI certificate chain and key."""
    if config.cert_file is None or config.key_file is None:
        raise FederationConfigError("federation: cert_file and key_file are required")
    # ssl reads the files by path: check first that each is a bounded regular file
    # (a FIFO would block the server's start for ever, /dev/zero fill its memory).
    for key, path in (("cert_file", config.cert_file), ("key_file", config.key_file)):
        try:
            read_small_file(path, max_bytes=MAX_PEM_BYTES, what=f"federation {key}")
        except UnreadableFileError as e:
            raise FederationConfigError(f"federation.{key}: {e.message}") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.cert_file, config.key_file)
    except (OSError, ssl.SSLError) as e:
        reason = getattr(e, "strerror", None) or getattr(e, "reason", None) or type(e).__name__
        raise FederationConfigError(
            f"federation: cannot load cert_file/key_file ({reason})"
        ) from None
    return context


def federation_listener(
    config: FederationConfig, bundle: Callable[[], TrustBundle]
) -> HttpListener:
    """The endpoint on ``config.address``; *bundle* is read (in a thread: it reads
    the datastore) at each request, so peers see a rotation at their next poll."""
    if config.address is None:
        raise FederationConfigError("federation: address is not set")
    hint = int(config.refresh_hint.total_seconds())

    async def serve_bundle() -> Response:
        try:
            current = replace(await asyncio.to_thread(bundle), refresh_hint=hint)
        except DatastoreUnavailableError as e:
            # Peers keep the bundle they have and poll again: a 503, not a 500.
            log.warning("federation endpoint: %s", e.message)
            return Response(503, b"bundle temporarily unavailable\n")
        return Response(200, current.to_spiffe_json().encode("utf-8"), BUNDLE_CONTENT_TYPE)

    return HttpListener(
        config.address, {"/": serve_bundle}, ssl_context=tls_context(config), name="federation"
    )


__all__ = ["BUNDLE_CONTENT_TYPE", "FederationConfigError", "federation_listener", "tls_context"]
