"""WSGI middleware (Flask, Django, any WSGI app) that verifies WIMSE callers.

On success the caller is at ``environ["custos.caller"]`` (in Flask:
``flask.request.environ["custos.caller"]``, or :func:`caller_of`). Failures
answer problem+json exactly as the ASGI middleware does, and the policy is
checked against the decoded ``SCRIPT_NAME + PATH_INFO`` the app routes on,
for the reason given in :mod:`custos.integrations.asgi`.

WSGI merges repeated header fields into one comma-joined value, so "two
Authorization fields" reaches us as one value with a comma; the WPT verifier
refuses such a value (a token68 has no comma), which keeps the check
fail-closed.

Signed responses work as in :mod:`custos.integrations.asgi`: for a caller that asked
(``wimse-sign-response``) the app's whole response -- its iterable and
anything passed to the legacy ``write()`` -- is collected (at most
``max_response`` bytes), signed by ``response_signer`` and only then handed to
the server; without a signer the request is refused with 400
``signed_response_unavailable`` before the app runs, and a response too large
or impossible to sign becomes a 500 problem, never an unsigned success.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any
from urllib.parse import quote

from custos._logging import get_logger
from custos.integrations.asgi import (
    ResponseBuffer,
    WimseMiddlewareBase,
    content_length,
    log_refusal,
    request_method,
    sign_response_or_refuse,
)
from custos.integrations.errors import (
    BodyTooLargeError,
    ResponseSigningError,
)
from custos.integrations.problem import Problem
from custos.wimse.errors import MalformedRequestError, WimseError
from custos.wimse.http.message import HttpMessage
from custos.wimse.http.origin import UnsafeTargetError, routing_path
from custos.wimse.verifier import Caller

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
log = get_logger("custos.wimse")


class WimseWSGIMiddleware(WimseMiddlewareBase):
    """``app.wsgi_app = WimseWSGIMiddleware(app.wsgi_app, verifier, policy=...)``.

    ``response_signer`` (a :class:`~custos.wimse.httpsig.ResponseSigner`)
    signs responses for callers that ask; ``max_response`` bounds what is
    buffered to do so.
    """

    app: WSGIApp

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if _routing_path(environ) in self.exempt:
            return self.app(environ, start_response)
        try:
            path = routing_path(_native(_routing_path(environ), "request path"))
            body = self._read_body(environ)
            request = _to_message(environ, body)
            caller = self.verify_caller(request, path)
        except WimseError as err:
            log_refusal("wimse_request_refused", err)
            return _problem(start_response, err)
        environ["custos.caller"] = caller
        if caller.wants_signed_response:
            return self._signed(environ, start_response, request, caller)
        return self.app(environ, start_response)

    def _signed(
        self,
        environ: dict[str, Any],
        start_response: StartResponse,
        request: HttpMessage,
        caller: Caller,
    ) -> Iterable[bytes]:
        """Run the app, keep its whole response, sign it, then hand it on."""
        assert self.response_signer is not None
        capture = _ResponseCapture(self.max_response)
        result = self.app(environ, capture.start_response)
        try:
            for chunk in result:
                capture.write(chunk)
                if capture.too_large:
                    break  # nothing more is needed to know the answer
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        try:
            signed = sign_response_or_refuse(
                self.response_signer, capture.response(), request, caller
            )
        except WimseError as err:
            log_refusal("wimse_response_refused", err)
            return _problem(start_response, err)
        start_response(capture.status_line, list(signed.headers))
        return [signed.body or b""]

    def _read_body(self, environ: dict[str, Any]) -> bytes:
        stream = environ["wsgi.input"]
        declared = environ.get("CONTENT_LENGTH") or ""
        if declared:
            length = content_length(declared)
            if length is None:
                raise MalformedRequestError("bad Content-Length")
            if length > self.max_body:
                raise BodyTooLargeError("request body over the configured limit")
            body: bytes = stream.read(length) if length else b""
            if len(body) != length:
                raise MalformedRequestError("client sent less body than announced")
        elif environ.get("wsgi.input_terminated"):
            # Chunked upload (the server marks the stream as ending by itself):
            # read one byte past the limit to tell "at the limit" from "over".
            body = stream.read(self.max_body + 1)
            if len(body) > self.max_body:
                raise BodyTooLargeError("request body over the configured limit")
            environ["CONTENT_LENGTH"] = str(len(body))
        else:
            body = b""
        # The app reads the body again from here; it sees exactly what was verified.
        environ["wsgi.input"] = io.BytesIO(body)
        return body


def _problem(start_response: StartResponse, err: WimseError) -> list[bytes]:
    problem = Problem.from_error(err)
    payload = problem.body()
    start_response(
        f"{problem.status} {HTTPStatus(problem.status).phrase}",
        [*problem.headers(), ("content-length", str(len(payload)))],
    )
    return [payload]


class _ResponseCapture(ResponseBuffer):
    """A ``start_response`` and ``write`` that keep the app's response instead
    of sending it."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.status_line: str | None = None

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        # Nothing has been sent yet, so a later call (with exc_info, PEP 3333)
        # simply replaces what the app said first.
        self.status_line = status
        self.too_large = False
        self.set_headers(list(headers))
        return self.add

    def write(self, data: bytes) -> None:
        self.add(data)

    def response(self) -> HttpMessage:
        status = self.status_line.split(" ", 1)[0] if self.status_line else ""
        usable = len(status) == 3 and status.isascii() and status.isdigit()
        if not self.too_large and not usable:
            raise ResponseSigningError("the app's response cannot be signed as sent")
        return self.message(int(status) if usable else 0)


def _native(value: str, what: str) -> str:
    """``value`` if it is a PEP 3333 native string (Latin-1: one character per
    byte received); a lone surrogate (a server that decoded with
    ``surrogateescape``) has no byte to stand for and is refused."""
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        raise UnsafeTargetError(f"the {what} is not Latin-1 text (PEP 3333)") from None
    return value


def _routing_path(environ: dict[str, Any]) -> str:
    return str(environ.get("SCRIPT_NAME", "")) + str(environ.get("PATH_INFO", "")) or "/"


def _raw_target(environ: dict[str, Any]) -> str:
    # The undecoded request target matters: PATH_INFO has %2e%2e already decoded
    # to "..", which would hide a path trick. gunicorn and werkzeug give RAW_URI /
    # REQUEST_URI; otherwise re-quote what we have.
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        return str(raw)
    path = quote(_routing_path(environ).encode("latin-1"), safe="/:@!$&'()*+,;=-._~")
    query = environ.get("QUERY_STRING", "")
    return path + (f"?{query}" if query else "")


def _to_message(environ: dict[str, Any], body: bytes) -> HttpMessage:
    headers: list[tuple[str, str]] = []
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            headers.append((key[5:].replace("_", "-").lower(), value))
    if environ.get("CONTENT_TYPE"):
        headers.append(("content-type", environ["CONTENT_TYPE"]))
    if environ.get("CONTENT_LENGTH"):
        headers.append(("content-length", environ["CONTENT_LENGTH"]))
    method = request_method(environ.get("REQUEST_METHOD"))
    target = _native(_raw_target(environ), "request target")
    return HttpMessage.request(method, target, headers, body or None)


def caller_of(environ: dict[str, Any]) -> Caller | None:
    """The verified caller of a WSGI request."""
    caller = environ.get("custos.caller")
    return caller if isinstance(caller, Caller) else None
