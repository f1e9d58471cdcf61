"""WSGI middleware (Flask, Django, any WSGI app) that verifies WIMSE callers.

On success the caller is at ``environ["custos.caller"]`` (in Flask:
``flask.request.environ["custos.caller"]``, or :func:`caller_of`). Failures
answer problem+json exactly as the ASGI middleware does, and the policy is
checked against the decoded ``SCRIPT_NAME + PATH_INFO`` the app routes on,
for the reason given in :mod:`custos.wimse.asgi`.

WSGI merges repeated header fields into one comma-joined value, so "two
Authorization fields" reaches us as one value with a comma; the WPT verifier
refuses such a value (a token68 has no comma), which keeps the check
fail-closed.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any
from urllib.parse import quote

import structlog

from custos.wimse.asgi import DEFAULT_MAX_BODY, BodyTooLargeError, routing_path_ok
from custos.wimse.errors import MalformedRequestError, WimseError
from custos.wimse.http import HttpMessage
from custos.wimse.policy import CallerPolicy
from custos.wimse.problem import Problem
from custos.wimse.verifier import Caller, RequestVerifier

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
log = structlog.get_logger("custos.wimse")


class WimseWSGIMiddleware:
    """``app.wsgi_app = WimseWSGIMiddleware(app.wsgi_app, verifier, policy=...)``."""

    def __init__(
        self,
        app: WSGIApp,
        verifier: RequestVerifier,
        *,
        policy: CallerPolicy | None = None,
        max_body: int = DEFAULT_MAX_BODY,
        exempt_paths: Iterable[str] = (),
    ) -> None:
        if max_body < 0:
            raise ValueError("max_body must be >= 0")
        self.app = app
        self.verifier = verifier
        self.policy = policy if policy is not None else CallerPolicy.allow_all()
        self.max_body = max_body
        self.exempt = frozenset(exempt_paths)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if _routing_path(environ) in self.exempt:
            return self.app(environ, start_response)
        try:
            body = self._read_body(environ)
            request = _to_message(environ, body)
            caller = self.verifier.verify(request)
            self.policy.check(caller.subject, routing_path_ok(_routing_path(environ)))
        except WimseError as err:
            # Only the code reaches the log and the client; tokens never do.
            log.info("wimse_request_refused", code=err.code, status=err.status)
            problem = Problem.from_error(err)
            payload = problem.body()
            start_response(
                f"{problem.status} {HTTPStatus(problem.status).phrase}",
                [*problem.headers(), ("content-length", str(len(payload)))],
            )
            return [payload]
        environ["custos.caller"] = caller
        return self.app(environ, start_response)

    def _read_body(self, environ: dict[str, Any]) -> bytes:
        stream = environ["wsgi.input"]
        declared = environ.get("CONTENT_LENGTH") or ""
        if declared:
            if not (declared.isascii() and declared.isdigit()):  # "²" is a digit to isdigit()
                raise MalformedRequestError("bad Content-Length")
            length = int(declared)
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
    method = environ["REQUEST_METHOD"]
    return HttpMessage.request(method, _raw_target(environ), headers, body or None)


def caller_of(environ: dict[str, Any]) -> Caller | None:
    """The verified caller of a WSGI request."""
    caller = environ.get("custos.caller")
    return caller if isinstance(caller, Caller) else None
