"""ASGI middleware (Starlette, FastAPI, any ASGI app) that verifies WIMSE callers.

On success the caller is put on the request: ``request.state.wimse_caller``
in Starlette/FastAPI (``scope["state"]["wimse_caller"]``), and
``scope["custos.caller"]`` for plain ASGI. On failure the app is never called
and the client gets RFC 9457 problem+json (401 + ``WWW-Authenticate: WPT`` for
WPT failures, 400 for WIT and other failures, 403 when policy refuses, 413 for
a body over the limit).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

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


class BodyTooLargeError(WimseError):
    code = "body_too_large"
    status = 413


class WimseASGIMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        verifier: RequestVerifier,
        *,
        policy: CallerPolicy | None = None,
        max_body: int = DEFAULT_MAX_BODY,
        exempt_paths: Iterable[str] = (),
    ) -> None:
        self.app = app
        self.verifier = verifier
        self.policy = policy or CallerPolicy.allow_all()
        self.max_body = max_body
        self.exempt = frozenset(exempt_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.exempt:
            await self.app(scope, receive, send)
            return
        try:
            body, more = await self._read_body(receive)
            request = _to_message(scope, body)
            caller = self.verifier.verify(request)
            self.policy.check(caller.subject, request.path)
        except WimseError as err:
            # Only the code reaches the log and the client; token contents never do.
            log.info("wimse_request_refused", code=err.code, status=err.status)
            await _send_problem(send, Problem.from_error(err))
            return
        scope.setdefault("state", {})["wimse_caller"] = caller
        scope["custos.caller"] = caller
        await self.app(scope, _replay_body(body, more, receive), send)

    async def _read_body(self, receive: Receive) -> tuple[bytes, bool]:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                # The caller went away mid-request: nothing to verify, nothing to answer.
                raise MalformedRequestError("client disconnected before the body was read")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise BodyTooLargeError("request body over the configured limit")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), False


def _to_message(scope: Scope, body: bytes) -> HttpMessage:
    raw_path = scope.get("raw_path")
    path = raw_path.decode("latin-1") if raw_path else scope["path"]
    query = scope.get("query_string", b"").decode("latin-1")
    target = path + (f"?{query}" if query else "")
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", [])]
    return HttpMessage.request(scope["method"], target, headers, body or None)


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
