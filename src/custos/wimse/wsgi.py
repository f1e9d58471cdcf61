"""WSGI middleware (Flask, Django, any WSGI app) that verifies WIMSE callers.

On success the caller is at ``environ["custos.caller"]`` (in Flask:
``flask.request.environ["custos.caller"]``). Failures answer problem+json
exactly as the ASGI middleware does.

WSGI merges repeated header fields into one comma-joined value, so "two
Authorization fields" reaches us as one value with a comma; the WPT verifier
refuses such a value, which keeps the check fail-closed.
"""

from __future__ import annotations

import io
from http import HTTPStatus
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote

import structlog

from custos.wimse.asgi import DEFAULT_MAX_BODY, BodyTooLargeError
from custos.wimse.errors import MalformedRequestError, WimseError
from custos.wimse.http import HttpMessage
from custos.wimse.policy import CallerPolicy
from custos.wimse.problem import Problem
from custos.wimse.verifier import Caller, RequestVerifier

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
log = structlog.get_logger("custos.wimse")


class WimseWSGIMiddleware:
    def __init__(
        self,
        app: WSGIApp,
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

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "") in self.exempt:
            return self.app(environ, start_response)
        try:
            body = self._read_body(environ)
            request = _to_message(environ, body)
            caller = self.verifier.verify(request)
            self.policy.check(caller.subject, request.path)
        except WimseError as err:
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
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            raise MalformedRequestError("bad Content-Length") from None
        if length < 0:
            raise MalformedRequestError("bad Content-Length")
        if length > self.max_body:
            raise BodyTooLargeError("request body over the configured limit")
        body: bytes = environ["wsgi.input"].read(length) if length else b""
        if len(body) != length:
            raise MalformedRequestError("client sent less body than announced")
        environ["wsgi.input"] = io.BytesIO(body)
        return body


def _raw_target(environ: dict[str, Any]) -> str:
    # The undecoded request target matters: PATH_INFO has %2e%2e already decoded
    # to "..", which would hide a path trick. gunicorn and werkzeug give RAW_URI /
    # REQUEST_URI; otherwise re-quote what we have.
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        return str(raw)
    path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    path = quote(path.encode("latin-1"), safe="/:@!$&'()*+,;=-._~")
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
    return HttpMessage.request(environ["REQUEST_METHOD"], _raw_target(environ), headers, body or None)


def caller_of(environ: dict[str, Any]) -> Caller | None:
    caller = environ.get("custos.caller")
    return caller if isinstance(caller, Caller) else None
