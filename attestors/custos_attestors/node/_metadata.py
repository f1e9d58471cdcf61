"""Bounded calls to a cloud metadata service (the agent halves' only network I/O).

Every request has a total deadline (not only a per-read timeout: a service that
trickles bytes cannot hold the agent), a size cap on the body, no redirects, no
proxies from the environment, and a few retries with backoff on transport errors,
timeouts and 5xx/429 answers.  Anything else (401, 403, 404) fails at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from urllib.parse import urlsplit

import httpx

from custos.errors import CustosError

log = logging.getLogger(__name__)

_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class MetadataUnavailableError(CustosError):
    """The metadata service did not answer in time, or answered something unusable."""

    code = "metadata_unavailable"


def check_endpoint(value: object, name: str = "endpoint") -> str:
    """An ``http(s)://host[:port]`` base URL without path, query or credentials."""
    if not isinstance(value, str) or len(value) > 256:
        raise ValueError(f"{name} must be an http(s) URL")
    parts = urlsplit(value)
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.username is not None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        raise ValueError(f"{name} must be http(s)://host[:port] with no path")
    return value.rstrip("/")


def check_number(
    config: Mapping[str, object], key: str, default: float, low: float, high: float
) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ValueError(f"{key} must be a number from {low} to {high}")
    return float(value)


def check_int(config: Mapping[str, object], key: str, default: int, low: int, high: int) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{key} must be an integer from {low} to {high}")
    return value


class MetadataClient:
    """One metadata service: ``request`` returns a body of at most ``max_bytes``."""

    def __init__(self, *, timeout: float, attempts: int, code: str) -> None:
        self._timeout = timeout
        self._attempts = attempts
        self._code = code

    def _error(self, message: str) -> MetadataUnavailableError:
        return MetadataUnavailableError(message, code=self._code)

    async def _once(
        self,
        client: httpx.AsyncClient,
        method: str,
        url: str,
        headers: Mapping[str, str],
        max_bytes: int,
    ) -> tuple[int, bytes]:
        async with asyncio.timeout(self._timeout):
            async with client.stream(method, url, headers=dict(headers)) as response:
                declared = response.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                    raise self._error(f"the metadata service sent more than {max_bytes} bytes")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > max_bytes:
                        raise self._error(f"the metadata service sent more than {max_bytes} bytes")
                return response.status_code, bytes(body)

    async def request(
        self,
        client: httpx.AsyncClient,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        max_bytes: int,
        what: str,
    ) -> bytes:
        problem = ""
        for attempt in range(self._attempts):
            if attempt:
                await asyncio.sleep(min(0.1 * 2 ** (attempt - 1), 2.0))
            try:
                status, body = await self._once(client, method, url, headers, max_bytes)
            except TimeoutError:
                problem = f"no answer within {self._timeout:g} s"
            except httpx.TransportError as e:
                problem = f"{type(e).__name__}"
            else:
                if status == 200:
                    return body
                problem = f"HTTP {status}"
                if status not in _RETRY_STATUS:
                    break
            log.warning(
                "metadata service: %s: %s (attempt %d of %d)",
                what,
                problem,
                attempt + 1,
                self._attempts,
            )
        raise self._error(f"the metadata service failed to give the {what}: {problem}")


def new_client() -> httpx.AsyncClient:
    # No proxies (a link-local address must not go through one), no redirects.
    # Each request has its own total deadline (asyncio.timeout), so no httpx timeout.
    return httpx.AsyncClient(trust_env=False, follow_redirects=False, timeout=None)  # noqa: S113
