"""ASGI middleware (Starlette, FastAPI, any ASGI app) that verifies WIMSE callers.

On success the caller is put on the request: ``request.state.wimse_caller``
in Starlette/FastAPI (``scope["state"]["wimse_caller"]``), and
``scope["custos.caller"]`` for plain ASGI (:func:`caller_of` reads either).
On failure the app is never called and the client gets RFC 9457
problem+json: 401 + ``WWW-Authenticate: WPT`` for WPT failures, 400 for WIT
and other failures, 403 when the policy refuses, 413 for a body over the
limit, 503 when the replay cache cannot answer.

The policy is checked against ``scope["path"]``: the *decoded* path the
router dispatches on, not the raw target the proof covers. Checking the raw
form would let ``/%70ay`` slip past a rule for ``/pay`` and still reach the
``/pay`` handler.

WebSocket handshakes are verified the same way (no body); a refused one is
closed before it is accepted, which servers answer with HTTP 403. Lifespan
events pass through.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

import anyio.to_thread
import structlog

from custos.wimse.errors import MalformedRequestError, WimseError
from custos.wimse.http import HttpMessage
from custos.wimse.policy import CallerPolicy
from custos.wimse.problem import Problem
from custos.wimse.verifier import Caller, RequestVerifier

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = structlog.get_logger("custos.wimse")
DEFAULT_MAX_BODY = 1 << 20
#: Close code for a refused WebSocket handshake (RFC 6455: policy violation).
_WS_POLICY_VIOLATION = 1008


class BodyTooLargeError(WimseError):
    code = "body_too_large"
    status = 413


class _ClientGone(Exception):
    """The client disconnected before its request body was complete."""


def routing_path_ok(path: str) -> str:
    """``path`` if the policy can judge it, else a 400.

    Dot segments are refused rather than resolved: some routers resolve them
    and some do not, and the policy must see the path the handler is chosen by.
    """
    if not path.startswith("/") or "\x00" in path:
        raise MalformedRequestError("unusable request path", code="unsafe_request_target")
    if any(seg in (".", "..") for seg in path.split("/")):
        raise MalformedRequestError("request path has dot segments", code="unsafe_request_target")
    return path


def declared_length(headers: Iterable[tuple[str, str]]) -> int | None:
    """The Content-Length a request announces, if it announces exactly one."""
    values = {v.strip() for k, v in headers if k.lower() == "content-length"}
    if len(values) != 1:
        return None
    value = values.pop()
    # isascii(): str.isdigit() also accepts digits like "²" that int() refuses.
    return int(value) if value.isascii() and value.isdigit() else None


class WimseASGIMiddleware:
    """``app = WimseASGIMiddleware(app, build_request_verifier(...), policy=...)``.

    ``verify_in_thread``: run verification in a worker thread, because a
    :class:`~custos.wimse.replay.RedisReplayCache` makes a network round trip
    that must not stall the event loop. Turn it off only with a memory cache.
    """

    def __init__(
        self,
        app: ASGIApp,
        verifier: RequestVerifier,
        *,
        policy: CallerPolicy | None = None,
        max_body: int = DEFAULT_MAX_BODY,
        exempt_paths: Iterable[str] = (),
        verify_in_thread: bool = True,
    ) -> None:
        if max_body < 0:
            raise ValueError("max_body must be >= 0")
        self.app = app
        self.verifier = verifier
        self.policy = policy if policy is not None else CallerPolicy.allow_all()
        self.max_body = max_body
        self.exempt = frozenset(exempt_paths)
        self.verify_in_thread = verify_in_thread

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket") or scope.get("path") in self.exempt:
            await self.app(scope, receive, send)
            return
        body = b""
        more = False
        try:
            # Decoded once: the length check and the verifier share them.
            headers = _headers(scope)
            if kind == "http":
                length = declared_length(headers)
                if length is not None and length > self.max_body:
                    raise BodyTooLargeError("request body over the configured limit")
                body, more = await self._read_body(receive)
            request = _to_message(scope, body, headers)
            if self.verify_in_thread:
                caller = await anyio.to_thread.run_sync(self._check, scope, request)
            else:
                caller = self._check(scope, request)
        except _ClientGone:
            # Nothing to verify and nobody to answer; the app never sees it.
            log.debug("wimse_client_disconnected")
            return
        except WimseError as err:
            # Only the code reaches the log and the client; tokens never do.
            log.info("wimse_request_refused", code=err.code, status=err.status)
            if kind == "websocket":
                await send({"type": "websocket.close", "code": _WS_POLICY_VIOLATION})
            else:
                await _send_problem(send, Problem.from_error(err))
            return
        scope.setdefault("state", {})["wimse_caller"] = caller
        scope["custos.caller"] = caller
        if kind == "websocket":
            await self.app(scope, receive, send)
        else:
            await self.app(scope, _replay_body(body, more, receive), send)

    def _check(self, scope: Scope, request: HttpMessage) -> Caller:
        caller = self.verifier.verify(request)
        self.policy.check(caller.subject, routing_path_ok(scope["path"]))
        return caller

    async def _read_body(self, receive: Receive) -> tuple[bytes, bool]:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise BodyTooLargeError("request body over the configured limit")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), False


def _headers(scope: Scope) -> tuple[tuple[str, str], ...]:
    # Latin-1 maps every byte to one character and back: nothing is lost or
    # rejected on the way to the verifier.
    return tuple([(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", ())])


def _to_message(
    scope: Scope, body: bytes, headers: tuple[tuple[str, str], ...] | None = None
) -> HttpMessage:
    raw_path = scope.get("raw_path")
    path = raw_path.decode("latin-1") if raw_path else scope["path"]
    query = scope.get("query_string", b"").decode("latin-1")
    target = path + (f"?{query}" if query else "")
    method = scope.get("method", "GET")  # a WebSocket handshake is a GET
    return HttpMessage(
        _headers(scope) if headers is None else headers,
        body or None,
        method.upper(),
        target,
        None,
    )


def _replay_body(body: bytes, more: bool, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": more}
        return await receive()

    return replay


async def _send_problem(send: Send, problem: Problem) -> None:
    body = problem.body()
    headers = [(k.encode(), v.encode()) for k, v in problem.headers()]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": problem.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def caller_of(scope_or_request: Any) -> Caller | None:
    """The verified caller of a Starlette request or an ASGI scope."""
    scope = getattr(scope_or_request, "scope", scope_or_request)
    caller = scope.get("custos.caller")
    return caller if isinstance(caller, Caller) else None
