"""Agent half of ``azure_msi``: a managed-identity token from the Instance Metadata Service.

``GET <endpoint>?api-version=2018-02-01&resource=<resource>`` with ``Metadata: true``
(Azure's IMDS token endpoint, what SPIRE's agent calls), over plain HTTP to the
link-local address. Every attempt is bounded as a whole (connect, request, the full
answer) by ``timeout`` and the answer by :data:`MAX_RESPONSE_BYTES`; a timeout, a
refused connection or an answer IMDS documents as transient (404, 410, 429, 5xx) is
tried again up to ``retries`` times, then the flow raises :class:`AzureMsiAgentError`.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import logging
import urllib.parse
from collections.abc import AsyncGenerator, Mapping

from custos._numbers import InvalidNumberError, finite_number, seconds
from custos.errors import CustosError
from custos.plugin.protocols import CoreConfig
from custos_attestors.node.azure_msi import wire

DEFAULT_ENDPOINT = "http://169.254.169.254/metadata/identity/oauth2/token"
DEFAULT_RESOURCE = "https://management.azure.com/"
API_VERSION = "2018-02-01"
DEFAULT_TIMEOUT = 5.0
DEFAULT_RETRIES = 2
RETRY_DELAY = 0.2
MAX_RESPONSE_BYTES = 64 * 1024
_TRANSIENT = frozenset({404, 410, 429})
log = logging.getLogger(__name__)


class AzureMsiAgentConfigError(CustosError, ValueError):
    code = "azure_msi_config"


class AzureMsiAgentError(CustosError):
    """IMDS gave no token (unreachable, timed out, refused, or answered garbage)."""

    code = "azure_msi_imds_unavailable"


class _Transient(Exception):
    pass


class _Bytes:
    """What :class:`http.client.HTTPResponse` reads from: an answer already received."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def makefile(self, *args: object, **kwargs: object) -> io.BytesIO:
        return io.BytesIO(self._data)


def parse_response(data: bytes) -> tuple[int, bytes]:
    """Status and body of a whole HTTP/1.x answer (chunked or with a length)."""
    response = http.client.HTTPResponse(_Bytes(data))  # type: ignore[arg-type]
    try:
        response.begin()
        body = response.read()
    except (http.client.HTTPException, ValueError) as e:
        raise AzureMsiAgentError(
            f"IMDS answered something that is not HTTP: {type(e).__name__}"
        ) from None
    return response.status, body


class AzureMsiAgentAttestor:
    """Settings: ``resource`` (the token's audience, the server's ``resource``; default
    Azure Resource Manager, as SPIRE), ``endpoint`` (IMDS token URL), ``timeout``
    (seconds per attempt), ``retries``."""

    def __init__(self) -> None:
        self._resource = DEFAULT_RESOURCE
        self._endpoint = urllib.parse.urlsplit(DEFAULT_ENDPOINT)
        self._timeout = DEFAULT_TIMEOUT
        self._retries = DEFAULT_RETRIES
        self._configured = False

    def configure(self, config: Mapping[str, object], core: CoreConfig) -> None:
        unknown = set(config) - {"resource", "endpoint", "timeout", "retries"}
        if unknown:
            raise AzureMsiAgentConfigError(
                f"unknown azure_msi settings: {', '.join(sorted(unknown))}"
            )
        resource = config.get("resource", DEFAULT_RESOURCE)
        if (
            not isinstance(resource, str)
            or not 0 < len(resource) <= 1024
            or not resource.isprintable()
        ):
            raise AzureMsiAgentConfigError("resource must be a non-empty string")
        endpoint = config.get("endpoint", DEFAULT_ENDPOINT)
        parts = urllib.parse.urlsplit(endpoint) if isinstance(endpoint, str) else None
        if (
            parts is None
            or parts.scheme != "http"
            or not parts.hostname
            or parts.query
            or parts.fragment
        ):
            raise AzureMsiAgentConfigError(
                "endpoint must be an http:// URL without a query (IMDS is plain HTTP on a "
                "link-local address)"
            )
        try:
            timeout = seconds(
                config.get("timeout", DEFAULT_TIMEOUT), name="timeout", minimum=0.01, maximum=120
            )
            retries = finite_number(
                config.get("retries", DEFAULT_RETRIES), name="retries", minimum=0, maximum=10
            )
        except InvalidNumberError as e:
            raise AzureMsiAgentConfigError(e.message) from None
        if retries != int(retries) or isinstance(config.get("retries"), bool):
            raise AzureMsiAgentConfigError("retries must be a whole number")
        self._resource, self._endpoint = resource, parts
        self._timeout, self._retries = timeout, int(retries)
        self._configured = True

    async def _get_once(self) -> bytes:
        parts = self._endpoint
        query = urllib.parse.urlencode({"api-version": API_VERSION, "resource": self._resource})
        target = f"{parts.path or '/'}?{query}"
        host = parts.hostname or ""
        port = parts.port or 80
        request = (
            f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nMetadata: true\r\n"
            "Accept: application/json\r\nConnection: close\r\n\r\n"
        ).encode("ascii")
        try:
            async with asyncio.timeout(self._timeout):
                reader, writer = await asyncio.open_connection(host, port)
                try:
                    writer.write(request)
                    await writer.drain()
                    data = await reader.read(MAX_RESPONSE_BYTES + 1)
                    while data and len(data) <= MAX_RESPONSE_BYTES:
                        more = await reader.read(MAX_RESPONSE_BYTES + 1 - len(data))
                        if not more:
                            break
                        data += more
                finally:
                    writer.close()
        except TimeoutError:
            raise _Transient(f"IMDS did not answer within {self._timeout:g} s") from None
        except OSError as e:
            raise _Transient(f"cannot reach IMDS at {parts.netloc}: {e.strerror or e}") from None
        if len(data) > MAX_RESPONSE_BYTES:
            raise AzureMsiAgentError(f"IMDS answered more than {MAX_RESPONSE_BYTES} bytes")
        status, body = parse_response(data)
        if status in _TRANSIENT or status >= 500:
            raise _Transient(f"IMDS answered HTTP {status}")
        if status != 200:
            raise AzureMsiAgentError(f"IMDS refused the token request: HTTP {status}")
        try:
            answer = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise AzureMsiAgentError("IMDS answered something that is not UTF-8 JSON") from None
        token = answer.get("access_token") if isinstance(answer, dict) else None
        try:
            return wire.encode(wire.check_token(token))
        except wire.AzureMsiEvidenceError:
            raise AzureMsiAgentError("IMDS answered no usable access_token") from None

    async def fetch_payload(self) -> bytes:
        """The evidence: one token from IMDS, with bounded attempts."""
        last = ""
        for attempt in range(self._retries + 1):
            if attempt:
                await asyncio.sleep(RETRY_DELAY * attempt)
            try:
                return await self._get_once()
            except _Transient as e:
                last = str(e)
                if attempt < self._retries:
                    log.warning(
                        "azure_msi: %s; trying again (%d of %d)", e, attempt + 1, self._retries
                    )
        raise AzureMsiAgentError(
            f"no managed-identity token after {self._retries + 1} attempts: {last}"
        )

    async def attestation_flow(self) -> AsyncGenerator[bytes, bytes]:
        if not self._configured:
            raise RuntimeError("azure_msi is not configured")
        # No challenge: the server decides on the token alone.
        yield await self.fetch_payload()

    def close(self) -> None:
        self._configured = False


__all__ = [
    "AzureMsiAgentAttestor",
    "AzureMsiAgentConfigError",
    "AzureMsiAgentError",
    "parse_response",
]
