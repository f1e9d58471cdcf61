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

Signed responses (httpsig-08, "Signing the Response"; a request accepted in
the -06 form behind ``accept_draft_06`` is answered in that form): when a verified
HTTP-signature caller asked for one (``wimse-sign-response``) and a
``response_signer`` is configured, the app's response is buffered (at most
``max_response`` bytes), signed with the server's own WIT and key (adding
Content-Digest, Signature-Input, Signature and Workload-Identity-Token, with
``wimse-req-nonce`` = the request's nonce) and only then sent. The draft
forbids a successful unsigned response in that case, so every way signing can
fail ends in an error instead: no signer configured -> 400
``signed_response_unavailable`` before the app runs
(:class:`~custos.wimse.httpsig.SignedResponseUnavailableError` says why 400);
a response over ``max_response`` -> 500 ``response_too_large``; a response
that cannot be signed (incomplete, with trailers, a Content-Digest that does
not match its body) -> 500 ``response_signing_failed``. A WebSocket handshake
that asks is refused like an unavailable signer: its 101 cannot be signed.
These error responses themselves are unsigned; a client that asked treats them
as the failures they are (``signed_response_missing``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

import anyio.to_thread

from custos._logging import get_logger
from custos.integrations.errors import (
    BodyTooLargeError,
    ResponseSigningError,
    ResponseTooLargeError,
)
from custos.integrations.problem import Problem, http_status
from custos.wimse.errors import MalformedRequestError, WimseError
from custos.wimse.http.message import HttpMessage
from custos.wimse.http.origin import routing_path
from custos.wimse.httpsig import SignedResponseUnavailableError, SignsResponses
from custos.wimse.policy import PolicyLike, as_policy
from custos.wimse.verifier import Caller, RequestVerifier

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = get_logger("custos.wimse")
DEFAULT_MAX_BODY = 1 << 20
#: The largest response the middleware buffers to sign it.
DEFAULT_MAX_RESPONSE = 1 << 20
#: ASGI extensions hidden from the app when its response is to be signed:
#: they let it send a body the middleware never sees (a file by path,
#: zero-copy), trailers the signature cannot cover, or (test clients) extra
#: messages that are not part of the response.
_HIDDEN_EXTENSIONS = (
    "http.response.pathsend",
    "http.response.zerocopy",
    "http.response.trailers",
    "http.response.debug",
)
#: Close code for a refused WebSocket handshake (RFC 6455: policy violation).
_WS_POLICY_VIOLATION = 1008


class _ClientGone(Exception):
    """The client disconnected before its request body was complete."""


@functools.lru_cache(maxsize=1024)
def _routing_path(path: str) -> str:
    """:func:`custos.wimse.http.origin.routing_path`, remembered per path: an
    app serves a handful of routes and the verdict depends on the path alone.
    Refusals raise through lru_cache and are not cached."""
    return routing_path(path)


#: RFC 9110 §9.1 / §5.6.2: a method is a token.
_METHOD = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}")
_COMMON_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


def request_method(method: object) -> str:
    """``method`` if it is an RFC 9110 token, else a 400: a method no router
    knows must not reach the app as if the proof had vouched for it (the WPT
    variant does not cover the method)."""
    if not isinstance(method, str):
        raise MalformedRequestError("the request method is not a string")
    if method not in _COMMON_METHODS and not _METHOD.fullmatch(method):
        raise MalformedRequestError("the request method is not an RFC 9110 token")
    return method


def request_length(values: Iterable[str] | None) -> int | None:
    """The request's Content-Length: None when it announces none, else the
    one number it announces; several different values or a value that is not
    a number are a 400 (RFC 9112 §6.3: a server must reject them, and two
    readings of one body are how requests are smuggled)."""
    if not values:
        return None
    length = _single_length(values)
    if length is None:
        raise MalformedRequestError("the request's Content-Length is not one number")
    return length


def declared_length(headers: Iterable[tuple[str, str]]) -> int | None:
    """The Content-Length a request announces, if it announces exactly one."""
    return _single_length([v for k, v in headers if k.lower() == "content-length"])


def _single_length(values: Iterable[str] | None) -> int | None:
    """:func:`declared_length` given the Content-Length values already picked out."""
    if values is None:
        return None
    distinct = {v.strip() for v in values}
    if len(distinct) != 1:
        return None
    return content_length(distinct.pop())


#: No body limit needs more digits; int() raises ValueError past 4300 digits.
_MAX_LENGTH_DIGITS = 19


def content_length(value: str) -> int | None:
    """One Content-Length value as a number, or None when it is not one
    (ASCII digits only, at most 19 of them)."""
    # isascii(): str.isdigit() also accepts digits like "²" that int() refuses.
    ok = value.isascii() and value.isdigit() and len(value) <= _MAX_LENGTH_DIGITS
    return int(value) if ok else None


class WimseMiddlewareBase:
    """What the ASGI and WSGI middlewares share: their options and the checks
    a request goes through once its :class:`HttpMessage` is built."""

    def __init__(
        self,
        app: Any,
        verifier: RequestVerifier,
        *,
        policy: PolicyLike = None,
        max_body: int = DEFAULT_MAX_BODY,
        exempt_paths: Iterable[str] = (),
        response_signer: SignsResponses | None = None,
        max_response: int = DEFAULT_MAX_RESPONSE,
    ) -> None:
        if max_body < 0:
            raise ValueError("max_body must be >= 0")
        if max_response < 0:
            raise ValueError("max_response must be >= 0")
        self.app = app
        self.verifier = verifier
        self.policy = as_policy(policy)
        self.max_body = max_body
        self.exempt = frozenset(exempt_paths)
        self.response_signer = response_signer
        self.max_response = max_response

    def verify_caller(self, request: HttpMessage, path: str, *, can_sign: bool = True) -> Caller:
        """The verified caller of ``request``, allowed by the policy for the
        decoded routing ``path``; a caller that asks for a signed response
        that cannot be made here (no signer, or ``can_sign`` False) is
        refused before the app runs: nothing it does can be sent unsigned."""
        caller = self.verifier.verify(request)
        self.policy.check(caller.subject, path)
        if caller.wants_signed_response and (self.response_signer is None or not can_sign):
            raise SignedResponseUnavailableError(
                "the caller asked for a signed response and none can be made here"
            )
        return caller


def log_refusal(event: str, err: WimseError) -> None:
    """Log a refused request or response: only the code and the status reach
    the log (and the client), never a token."""
    log.info(event, code=err.code, status=http_status(err))


class WimseASGIMiddleware(WimseMiddlewareBase):
    """``app = WimseASGIMiddleware(app, build_request_verifier(...), policy=...)``.

    ``verify_in_thread``: run verification (and response signing) in a worker
    thread, because a :class:`~custos.wimse.replay.RedisReplayCache` makes a
    network round trip and a device key may take milliseconds to sign, neither
    of which may stall the event loop. Turn it off only with a memory cache.

    ``response_signer`` (a :class:`~custos.wimse.httpsig.ResponseSigner`)
    signs responses for callers that ask; ``max_response`` bounds what is
    buffered to do so (see the module docstring).
    """

    def __init__(
        self,
        app: ASGIApp,
        verifier: RequestVerifier,
        *,
        policy: PolicyLike = None,
        max_body: int = DEFAULT_MAX_BODY,
        exempt_paths: Iterable[str] = (),
        verify_in_thread: bool = True,
        response_signer: SignsResponses | None = None,
        max_response: int = DEFAULT_MAX_RESPONSE,
    ) -> None:
        super().__init__(
            app,
            verifier,
            policy=policy,
            max_body=max_body,
            exempt_paths=exempt_paths,
            response_signer=response_signer,
            max_response=max_response,
        )
        self.app: ASGIApp = app
        self.verify_in_thread = verify_in_thread

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket") or scope.get("path") in self.exempt:
            await self.app(scope, receive, send)
            return
        body = b""
        more = False
        try:
            # Decoded once; HttpMessage indexes them itself (one public lookup).
            headers = _headers(scope)
            if kind == "http":
                length = request_length([v for k, v in headers if k.lower() == "content-length"])
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
            log_refusal("wimse_request_refused", err)
            if kind == "websocket":
                await send({"type": "websocket.close", "code": _WS_POLICY_VIOLATION})
            else:
                await _send_problem(send, Problem.from_error(err))
            return
        scope.setdefault("state", {})["wimse_caller"] = caller
        scope["custos.caller"] = caller
        if kind == "websocket":
            await self.app(scope, receive, send)
        elif caller.wants_signed_response:
            await self._signed(scope, _replay_body(body, more, receive), send, request, caller)
        else:
            await self.app(scope, _replay_body(body, more, receive), send)

    def _check(self, scope: Scope, request: HttpMessage) -> Caller:
        # A WebSocket handshake's 101 cannot be signed.
        return self.verify_caller(
            request, _routing_path(scope["path"]), can_sign=scope["type"] != "websocket"
        )

    async def _signed(
        self, scope: Scope, receive: Receive, send: Send, request: HttpMessage, caller: Caller
    ) -> None:
        """Run the app, keep its whole response, sign it, then send it."""
        extensions = scope.get("extensions")
        if extensions:
            scope["extensions"] = {
                k: v for k, v in extensions.items() if k not in _HIDDEN_EXTENSIONS
            }
        capture = _ResponseCapture(self.max_response)
        await self.app(scope, receive, capture.send)
        try:
            response = capture.response()
            if self.verify_in_thread:
                signed = await anyio.to_thread.run_sync(self._sign, response, request, caller)
            else:
                signed = self._sign(response, request, caller)
        except WimseError as err:
            log_refusal("wimse_response_refused", err)
            await _send_problem(send, Problem.from_error(err))
            return
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in signed.headers]
        await send({"type": "http.response.start", "status": signed.status, "headers": headers})
        await send({"type": "http.response.body", "body": signed.body or b""})

    def _sign(self, response: HttpMessage, request: HttpMessage, caller: Caller) -> HttpMessage:
        assert self.response_signer is not None
        return sign_response_or_refuse(self.response_signer, response, request, caller)

    async def _read_body(self, receive: Receive) -> tuple[bytes, bool]:
        # The usual request, its whole body (often none) in one message,
        # without the chunk list; the same checks as the loop below.
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        if len(chunk) > self.max_body:
            raise BodyTooLargeError("request body over the configured limit")
        if not message.get("more_body", False):
            return (chunk if type(chunk) is bytes else b"".join((chunk,))), False
        return await self._read_rest(receive, chunk)

    async def _read_rest(self, receive: Receive, first: bytes) -> tuple[bytes, bool]:
        chunks: list[bytes] = [first]
        size = len(first)
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


def sign_response_or_refuse(
    signer: SignsResponses, response: HttpMessage, request: HttpMessage, caller: Caller
) -> HttpMessage:
    """``response`` signed for ``caller``'s request, or ResponseSigningError (a 500).

    Shared by the ASGI and WSGI middlewares. Any refusal of the signer (a
    digest that lies, a WIT header the app set itself, a signer whose
    algorithm is not the WIT's) means this response cannot go out at all.
    """
    assert caller.nonce is not None
    try:
        return signer.sign(response, request=request, request_nonce=caller.nonce)
    except ResponseSigningError:
        raise
    except WimseError as e:
        raise ResponseSigningError(f"the response cannot be signed: {e.code}") from e


def _to_message(
    scope: Scope,
    body: bytes,
    headers: tuple[tuple[str, str], ...] | None = None,
) -> HttpMessage:
    raw_path = scope.get("raw_path")
    path = raw_path.decode("latin-1") if raw_path else scope["path"]
    query = scope.get("query_string", b"").decode("latin-1")
    target = path + (f"?{query}" if query else "")
    # Kept exactly as received: methods are case-sensitive (RFC 9110 §9.1).
    method = request_method(scope.get("method", "GET"))  # a WebSocket handshake is a GET
    if headers is None:
        headers = _headers(scope)
    return HttpMessage(headers, body or None, method, target, None)


class ResponseBuffer:
    """An app's response headers and body kept for signing, at most ``limit``
    body bytes (beyond that it only counts); shared by the ASGI and WSGI
    captures."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.headers: list[tuple[str, str]] = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.too_large = False

    def set_headers(self, headers: list[tuple[str, str]]) -> None:
        self.headers = headers
        length = declared_length(headers)
        if self.size > self.limit or (length is not None and length > self.limit):
            self.too_large = True

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            self.too_large = True
            self.chunks.clear()
        elif not self.too_large:
            self.chunks.append(bytes(chunk))

    def message(self, status: int) -> HttpMessage:
        if self.too_large:
            raise ResponseTooLargeError("the response is over the configured limit for signing")
        return HttpMessage.response(status, self.headers, b"".join(self.chunks) or None)


class _ResponseCapture(ResponseBuffer):
    """An ASGI ``send`` that keeps the app's response instead of sending it."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.status: int | None = None
        self.complete = False
        self.unsignable = False

    async def send(self, message: Message) -> None:
        kind = message.get("type")
        if self.complete:
            self.unsignable = True  # nothing may follow the last body message
        elif kind == "http.response.start" and self.status is None:
            self.status = int(message["status"])
            self.set_headers(
                [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", ())]
            )
            if message.get("trailers"):
                self.unsignable = True
        elif kind == "http.response.body" and self.status is not None:
            self.add(message.get("body", b""))
            if not message.get("more_body", False):
                self.complete = True
        else:
            # A second start, a body before the start, trailers, pathsend...
            self.unsignable = True

    def response(self) -> HttpMessage:
        if not self.too_large and (self.unsignable or not self.complete or self.status is None):
            raise ResponseSigningError("the app's response cannot be signed as sent")
        return self.message(self.status or 0)


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
