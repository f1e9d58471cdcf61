"""A narrow Docker Engine API client: ``GET /containers/<id>/json`` over the engine's
Unix socket, with httpx, bounded in time and size.

Only what the attestor needs. The response is read as a stream and abandoned past
``max_response_bytes``; the whole call (connect, headers, body) is bounded by
``timeout`` seconds, so an engine that drips bytes cannot hold a caller longer.
"""

from __future__ import annotations

import asyncio
import json
import re

import httpx

from custos.plugin.errors import PluginError

DEFAULT_API_TIMEOUT = 2.0
#: A container's inspect document is a few KiB (labels and env included); 1 MiB is
#: far above any real one and bounds what a misbehaving engine can make us hold.
DEFAULT_MAX_RESPONSE_BYTES = 1024 * 1024

_CONTAINER_ID = re.compile(r"^[0-9a-f]{64}$")


class ContainerLookupError(PluginError):
    """The engine could not be asked, or answered something that is not an inspect
    document (the attestor logs it and returns no ``docker`` selectors)."""

    code = "docker_lookup_failed"


class ContainerNotFoundError(ContainerLookupError):
    """The engine knows no such container (another runtime's, or it is gone)."""

    code = "docker_container_not_found"


class DockerApi:
    """``inspect(container_id)`` -> the decoded JSON object the engine returned."""

    def __init__(
        self,
        socket_path: str,
        *,
        timeout: float = DEFAULT_API_TIMEOUT,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.max_response_bytes = max_response_bytes
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _http(self) -> httpx.AsyncClient:
        # Made lazily: configure() runs outside any event loop, and a client's
        # connections belong to the loop that opened them (one per loop).
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._loop = loop
            self._client = httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=self.socket_path, retries=0),
                base_url="http://docker",
                timeout=httpx.Timeout(self.timeout),
                follow_redirects=False,
                trust_env=False,
            )
        return self._client

    async def inspect(self, container_id: str) -> dict[str, object]:
        if not _CONTAINER_ID.match(container_id):
            raise ContainerLookupError(f"not a container ID: {container_id!r}")
        try:
            return await asyncio.wait_for(self._inspect(container_id), self.timeout)
        except TimeoutError:
            raise ContainerLookupError(
                f"the Docker engine did not answer within {self.timeout:g} s"
            ) from None
        except httpx.HTTPError as e:
            raise ContainerLookupError(
                f"the Docker engine at {self.socket_path} could not be asked: "
                f"{type(e).__name__}: {e}"
            ) from None

    async def _inspect(self, container_id: str) -> dict[str, object]:
        async with self._http().stream("GET", f"/containers/{container_id}/json") as resp:
            if resp.status_code == 404:
                raise ContainerNotFoundError(f"the Docker engine knows no container {container_id}")
            if resp.status_code != 200:
                raise ContainerLookupError(
                    f"the Docker engine answered HTTP {resp.status_code} for container "
                    f"{container_id}"
                )
            declared = resp.headers.get("content-length")
            if declared is not None and declared.isdigit():
                if int(declared) > self.max_response_bytes:
                    raise ContainerLookupError(
                        f"the Docker engine's answer is {declared} bytes, over "
                        f"{self.max_response_bytes}"
                    )
            body = bytearray()
            async for chunk in resp.aiter_raw():
                body += chunk
                if len(body) > self.max_response_bytes:
                    raise ContainerLookupError(
                        f"the Docker engine's answer is over {self.max_response_bytes} bytes"
                    )
        try:
            doc = json.loads(bytes(body))
        except (ValueError, UnicodeDecodeError):
            raise ContainerLookupError("the Docker engine's answer is not JSON") from None
        if not isinstance(doc, dict):
            raise ContainerLookupError("the Docker engine's answer is not a JSON object")
        return doc

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    def drop(self) -> None:
        """Forget the client without awaiting (a plugin's ``close`` is synchronous):
        its pooled Unix-socket connections are closed when it is collected."""
        self._client = None
        self._loop = None


__all__ = [
    "DEFAULT_API_TIMEOUT",
    "DEFAULT_MAX_RESPONSE_BYTES",
    "ContainerLookupError",
    "ContainerNotFoundError",
    "DockerApi",
]
