"""A small HTTP/1.1 listener for the server's operations endpoints.

Two listeners use it: ``[http]`` (``/metrics`` for Prometheus and ``/healthz``) and
``[federation]`` (the SPIFFE bundle endpoint, over TLS).  Both answer a handful of
GET requests from scrapers and peer servers, so this is a bounded request reader on
the server's own asyncio loop (no web framework, no extra thread): GET and HEAD only,
the request head at most 8 KiB and read within 10 s, one request per connection, at
most 64 connections at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from custos.server.config import parse_address

log = logging.getLogger(__name__)

MAX_REQUEST_HEAD_BYTES = 8 * 1024
REQUEST_TIMEOUT_SECONDS = 10.0
#: Connections served at once; more are closed at once (a federation endpoint faces
#: the network: idle connections must not use up the server's file descriptors).
MAX_CONNECTIONS = 64

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


Handler = Callable[[], Awaitable[Response]]


class HttpListener:
    """Serves ``routes`` (exact paths, query ignored) on ``address``."""

    def __init__(
        self,
        address: str,
        routes: Mapping[str, Handler],
        *,
        ssl_context: ssl.SSLContext | None = None,
        name: str = "http",
    ) -> None:
        self.host, self.port = parse_address(address)
        self._routes = dict(routes)
        self._ssl = ssl_context
        self.name = name
        self._server: asyncio.Server | None = None
        self._active = 0

    @property
    def address(self) -> str:
        """``host:port`` actually bound."""
        if self._server is None or not self._server.sockets:
            return f"{self.host}:{self.port}"
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def active_connections(self) -> int:
        return self._active

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve,
            self.host,
            self.port,
            ssl=self._ssl,
            limit=MAX_REQUEST_HEAD_BYTES,
            ssl_handshake_timeout=REQUEST_TIMEOUT_SECONDS if self._ssl else None,
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), REQUEST_TIMEOUT_SECONDS)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._active >= MAX_CONNECTIONS:
            writer.close()
            return
        self._active += 1
        try:
            try:
                response, head_only = await asyncio.wait_for(
                    self._respond(reader), REQUEST_TIMEOUT_SECONDS
                )
            except TimeoutError:
                response, head_only = Response(408, b"request timeout\n"), False
            await _write(writer, response, head_only=head_only)
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing to answer
        finally:
            self._active -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[Response, bool]:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return Response(431, b"request head too large\n"), False
        request_line = head.split(b"\r\n", 1)[0]
        parts = request_line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return Response(400, b"bad request\n"), False
        method, target = parts[0], parts[1]
        if method not in (b"GET", b"HEAD"):
            return Response(405, b"only GET and HEAD\n"), False
        path = target.split(b"?", 1)[0].decode("ascii", "replace")
        handler = self._routes.get(path)
        if handler is None:
            return Response(404, b"not found\n"), method == b"HEAD"
        try:
            return await handler(), method == b"HEAD"
        except Exception:
            log.exception("%s listener: %s failed", self.name, path)
            return Response(500, b"internal error\n"), method == b"HEAD"


async def _write(writer: asyncio.StreamWriter, response: Response, *, head_only: bool) -> None:
    reason = _REASONS.get(response.status, "")
    head = (
        f"HTTP/1.1 {response.status} {reason}\r\n"
        f"Content-Type: {response.content_type}\r\n"
        f"Content-Length: {len(response.body)}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")
    writer.write(head if head_only else head + response.body)
    await writer.drain()


__all__ = ["MAX_CONNECTIONS", "MAX_REQUEST_HEAD_BYTES", "Handler", "HttpListener", "Response"]
