"""Small HTTP(S) servers on loopback for the test fakes (no pytest import).

Why this module: every local stand-in for a remote service (``fake_aws``, ``fake_gcp``,
``fake_azure``, ``fake_kube``, ``fake_kubelet``) needs the same plumbing, and each used
to carry its own copy: ``http.server`` on a free 127.0.0.1 port, served from a daemon
thread, optionally wrapped in TLS, and a stop that also releases a request the fake
holds on purpose (a "hang" knob).  Here it is once:

- :class:`QuietHandler`: an HTTP/1.1 request handler that logs nothing, with
  :meth:`QuietHandler.send` (status, headers, ``Content-Length``, body);
- :class:`LoopbackServer`: the threaded server for a handler class; :attr:`closing` is
  set by :meth:`LoopbackServer.close` before the server shuts down, so a handler
  waiting on it returns;
- :class:`StartableFake`: a fake with its own request handler class, served from
  :meth:`StartableFake.start` to :meth:`StartableFake.stop` (or ``with
  fake.running():``);
- :class:`LocalHttpServer`: a fake written as one method, ``handle(request, method,
  body)`` returning a :class:`Response` (None: hang until closed), started at
  construction, every request recorded; its ``hang`` and ``fail_first`` knobs (no
  answer; that many 503s first) apply to every such fake.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)


class QuietHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive, no request log on stderr."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def send(self, status: int, body: bytes, headers: Mapping[str, str] | None = None) -> None:
        """Answer ``status`` with ``headers``, then ``Content-Length`` and ``body``."""
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class LoopbackServer:
    """A ``ThreadingHTTPServer`` for ``handler`` on a free 127.0.0.1 port (TLS with
    ``tls``), served by a daemon thread from :meth:`start` until :meth:`close`."""

    def __init__(
        self,
        handler: type[BaseHTTPRequestHandler],
        *,
        tls: ssl.SSLContext | None = None,
        name: str | None = None,
    ) -> None:
        self.closing = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = int(self.httpd.server_address[1])
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name=name, daemon=True)

    def start(self) -> LoopbackServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self.closing.set()
        if self._thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)


class StartableFake:
    """A fake served by a :class:`LoopbackServer` while started.  Subclasses give
    :meth:`handler` (and :meth:`server_tls` for HTTPS); a handler that holds a request
    on purpose waits on :attr:`stopping`, set by :meth:`stop`."""

    #: The serving thread's name.
    thread_name = "fake"

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self._server: LoopbackServer | None = None

    def handler(self) -> type[BaseHTTPRequestHandler]:
        raise NotImplementedError

    def server_tls(self) -> ssl.SSLContext | None:
        return None

    @property
    def base_url(self) -> str:
        """``http(s)://127.0.0.1:<port>`` while started."""
        assert self._server is not None, "the fake is not started"
        return self._server.url

    def start(self) -> Self:
        server = LoopbackServer(self.handler(), tls=self.server_tls(), name=self.thread_name)
        self._server = server.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self._server is not None:
            self._server.close()
            self._server = None

    @contextmanager
    def running(self) -> Iterator[Self]:
        self.start()
        try:
            yield self
        finally:
            self.stop()


class LocalHttpServer:
    """A threaded HTTP(S) server on 127.0.0.1 calling ``self.handle(request, method,
    body)``; every request is recorded as ``(method, path, headers)``.  Set ``hang``
    (never answer until closed) or ``fail_first`` (answer that many requests 503
    first) on any of them."""

    hang: bool = False
    fail_first: int = 0

    def __init__(self, *, tls: ssl.SSLContext | None = None) -> None:
        owner = self
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._faults = threading.Lock()

        class _Handler(QuietHandler):
            def _serve(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                owner.requests.append((method, self.path, dict(self.headers.items())))
                try:
                    answer = owner._answer(self, method, body)
                except Exception:  # noqa: BLE001 (a broken fake must answer 500, not hang)
                    answer = Response(500, b"fake server error")
                if answer is None:  # hang: no answer until the server closes
                    owner.closing.wait()
                    self.close_connection = True
                    return
                self.send(answer.status, answer.body, answer.headers)

            def do_GET(self) -> None:
                self._serve("GET")

            def do_PUT(self) -> None:
                self._serve("PUT")

            def do_POST(self) -> None:
                self._serve("POST")

        self._server = LoopbackServer(_Handler, tls=tls).start()
        self.closing = self._server.closing
        self.port = self._server.port
        self.url = self._server.url

    def _answer(self, request: BaseHTTPRequestHandler, method: str, body: bytes) -> Response | None:
        if self.hang:
            return None
        with self._faults:
            if self.fail_first > 0:
                self.fail_first -= 1
                return Response(503, b"Service Unavailable")
        return self.handle(request, method, body)

    def handle(self, request: BaseHTTPRequestHandler, method: str, body: bytes) -> Response | None:
        raise NotImplementedError

    def close(self) -> None:
        self._server.close()

    def __enter__(self) -> LocalHttpServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["LocalHttpServer", "LoopbackServer", "QuietHandler", "Response", "StartableFake"]
