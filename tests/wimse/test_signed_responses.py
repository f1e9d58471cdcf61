"""Signed responses from the relying-party middleware (httpsig-06 "Signing the
Response"), ASGI and WSGI, end to end: the client signs a request with
``wimse-sign-response``, the middleware signs the app's answer with the
server's own WIT and key, and the client checks it with ``verify_response``.

- asked + signer configured: the response carries Content-Digest,
  Signature-Input, Signature and the server's Workload-Identity-Token, bound
  to the request's nonce (``wimse-req-nonce``), and verifies;
- asked + no signer: 400 ``signed_response_unavailable``, the app never runs;
- asked + a response over ``max_response``: 500 ``response_too_large``, never
  an unsigned success;
- not asked: the response goes out as the app made it.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from flask import Flask
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect
from wimse_rig import Calls, ca_bundles, run_asgi
from wimse_rig import mint_example_wit as mint

from custos.bundle import BundleSet
from custos.identity import SpiffeId
from custos.integrations.asgi import WimseASGIMiddleware
from custos.integrations.wsgi import WimseWSGIMiddleware
from custos.keys.software import MemoryKeyStore
from custos.wimse.digest import content_digest
from custos.wimse.http.message import HttpMessage
from custos.wimse.httpsig import (
    HTTPSIG_ERROR_CODES,
    HttpSignatureVerifier,
    ResponseSigner,
    request_signature_input,
    sign_request,
)
from custos.wimse.replay import MemoryReplayCache
from custos.wimse.verifier import RequestVerifier, build_request_verifier
from custos.wimse.wit import WitVerifier

WEB = SpiffeId.parse("spiffe://example.org/ns/shop/sa/web")
API = SpiffeId.parse("spiffe://example.org/ns/shop/sa/api")
ORIGIN = "https://api.example.org"
PROBLEM_KEYS = {"type", "title", "status", "code"}


@pytest.fixture(scope="module")
def store() -> MemoryKeyStore:
    s = MemoryKeyStore()
    s.create("ca", "ES256")
    s.create("web", "ES256")
    s.create("api", "EdDSA")
    return s


@pytest.fixture(scope="module")
def bundles(store: MemoryKeyStore) -> BundleSet:
    return ca_bundles(store)


@pytest.fixture(scope="module")
def web_wit(store: MemoryKeyStore) -> str:
    return mint(store, WEB, "web")


@pytest.fixture(scope="module")
def api_signer(store: MemoryKeyStore) -> ResponseSigner:
    return ResponseSigner(store.get("api"), mint(store, API, "api"))


def client_verifier(bundles: BundleSet) -> HttpSignatureVerifier:
    """The calling workload's side: it checks the answers it gets."""
    return HttpSignatureVerifier(WitVerifier(bundles), MemoryReplayCache(), [])


def signed_request(
    store: MemoryKeyStore,
    wit: str,
    path: str = "/pay",
    body: bytes = b'{"amount": 1}',
    *,
    ask: bool = True,
    method: str = "POST",
) -> HttpMessage:
    headers = [("Content-Type", "application/json")] if body else []
    return sign_request(
        HttpMessage.request(method, path, headers, body or None),
        signer=store.get("web"),
        wit=wit,
        audience=f"{ORIGIN}{path}",
        sign_response=ask,
    )


def as_message(got: httpx.Response) -> HttpMessage:
    return HttpMessage.response(got.status_code, got.headers.multi_items(), got.content)


def assert_problem(got: httpx.Response, status: int, code: str) -> None:
    assert got.status_code == status, got.text
    assert got.headers["content-type"] == "application/problem+json"
    doc = got.json()
    assert set(doc) == PROBLEM_KEYS and doc["code"] == code
    assert "signature" not in got.headers


# -- ASGI ------------------------------------------------------------------------------


def starlette_app(verifier: RequestVerifier, calls: Calls, **kw: Any) -> WimseASGIMiddleware:
    async def pay(request: Request) -> JSONResponse:
        calls.n += 1
        body = await request.body()
        return JSONResponse({"sub": request.state.wimse_caller.subject, "got": body.decode()})

    async def big(request: Request) -> PlainTextResponse:
        calls.n += 1
        return PlainTextResponse("x" * 5000)

    async def stream(request: Request) -> StreamingResponse:
        calls.n += 1

        async def chunks() -> Any:
            for i in range(5):
                yield f"part {i}\n".encode()

        return StreamingResponse(chunks(), media_type="text/plain")

    async def huge_stream(request: Request) -> StreamingResponse:
        calls.n += 1

        async def chunks() -> Any:
            for _ in range(10):
                yield b"y" * 1000

        return StreamingResponse(chunks(), media_type="text/plain")

    async def ws(websocket: WebSocket) -> None:
        calls.n += 1
        await websocket.accept()
        await websocket.close()

    app = Starlette(
        routes=[
            Route("/pay", pay, methods=["GET", "POST"]),
            Route("/big", big, methods=["GET", "POST"]),
            Route("/stream", stream, methods=["GET", "POST"]),
            Route("/huge-stream", huge_stream, methods=["GET", "POST"]),
            WebSocketRoute("/ws", ws),
        ]
    )
    return WimseASGIMiddleware(app, verifier, **kw)


def send(client: TestClient, request: HttpMessage) -> httpx.Response:
    assert request.method is not None and request.target is not None
    return client.request(
        request.method, request.target, headers=list(request.headers), content=request.body
    )


def asgi_client(bundles: BundleSet, calls: Calls, **kw: Any) -> TestClient:
    verifier = build_request_verifier(bundles, [ORIGIN])
    return TestClient(starlette_app(verifier, calls, **kw), base_url=ORIGIN)


def test_asgi_signs_the_response_the_caller_asked_for(
    store: MemoryKeyStore, bundles: BundleSet, web_wit: str, api_signer: ResponseSigner
) -> None:
    calls = Calls()
    client = asgi_client(bundles, calls, response_signer=api_signer)
    request = signed_request(store, web_wit)
    got = send(client, request)
    assert got.status_code == 200, got.text
    assert got.json() == {"sub": str(WEB), "got": '{"amount": 1}'}
    assert got.headers["content-digest"] == content_digest(got.content)
    result = client_verifier(bundles).verify_response(as_message(got), request)
    assert result is not None and result.subject == str(API)
    assert result.params["wimse-req-nonce"] == request_signature_input(request).params["nonce"]
    assert '"@path";req' in result.covered and '"content-digest"' in result.covered
    assert calls.n == 1


def test_asgi_signed_response_is_bound_to_its_request(
    store: MemoryKeyStore, bundles: BundleSet, web_wit: str, api_signer: ResponseSigner
) -> None:
    client = asgi_client(bundles, Calls(), response_signer=api_signer)
    first, second = signed_request(store, web_wit), signed_request(store, web_wit)
    got = send(client, first)
    verifier = client_verifier(bundles)
    with pytest.raises(Exception) as err:
        verifier.verify_response(as_message(got), second)
    assert getattr(err.value, "code", None) == "wimse_req_nonce_mismatch"
    tampered = HttpMessage.response(200, got.headers.multi_items(), b'{"sub": "someone else"}')
    with pytest.raises(Exception) as err:
        verifier.verify_response(tampered, first)
    assert getattr(err.value, "code", None) == "content_digest_mismatch"


def test_asgi_signs_a_streamed_response_after_buffering_it(
    store: MemoryKeyStore, bundles: BundleSet, web_wit: str, api_signer: ResponseSigner
) -> None:
    client = asgi_client(bundles, Calls(), response_signer=api_signer)
    request = signed_request(store, web_wit, "/stream", b"")
    got = send(client, request)
    assert got.content == b"".join(f"part {i}\n".encode() for i in range(5))
    assert client_verifier(bundles).verify_response(as_message(got), request) is not None


def test_asgi_asked_without_a_signer_is_refused_before_the_app(
    store: MemoryKeyStore, bundles: BundleSet, web_wit: str
) -> None:
    calls = Calls()
    client = asgi_client(bundles, calls)
    request = signed_request(store, web_wit)
    got = send(client, request)
    assert_problem(got, 400, "signed_response_unavailable")
    assert "signed_response_unavailable" in HTTPSIG_ERROR_CODES
    assert calls.n == 0
    # and what the client makes of that answer: not a signed success
    with pytest.raises(Exception) as err:
        client_verifier(bundles).verify_response(as_message(got), request)
    assert getattr(err.value, "code", None) == "signed_response_missing"


@pytest.mark.parametrize("path", ["/big", "/huge-stream"])
def test_asgi_response_over_the_limit_is_500_not_an_unsigned_success(
    store: MemoryKeyStore,
    bundles: BundleSet,
    web_wit: str,
    api_signer: ResponseSigner,
    path: str,
) -> None:
    calls = Calls()
    client = asgi_client(bundles, calls, response_signer=api_signer, max_response=4096)
    got = send(client, signed_request(store, web_wit, path, b""))
    assert_problem(got, 500, "response_too_large")
    assert calls.n == 1


def test_asgi_unasked_response_goes_out_as_the_app_made_it(
    store: MemoryKeyStore, bundles: BundleSet, web_wit: str, api_signer: ResponseSigner
) -> None:
    client = asgi_client(bundles, Calls(), response_signer=api_signer, max_response=16)
    request = signed_request(store, web_wit, ask=False)
    got = send(client, request)
    assert got.status_code == 200 and "signature" not in got.headers
    assert client_verifier(bundles).verify_response(as_message(got), request) is None


def test_asgi_websocket_cannot_get_a_signed_handshake_answer(
    store: MemoryKeyStore, bundles: BundleSet, web_wit: str, api_signer: ResponseSigner
) -> None:
    calls = Calls()
    client = asgi_client(bundles, calls, response_signer=api_signer)
    request = signed_request(store, web_wit, "/ws", b"", method="GET")
    headers = {k: v for k, v in request.headers}
    with pytest.raises(WebSocketDisconnect), client.websocket_connect("/ws", headers=headers):
        pass
    assert calls.n == 0


def http_scope(request: HttpMessage) -> dict[str, Any]:
    assert request.method is not None and request.target is not None
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "https",
        "server": ("api.example.org", 443),
        "path": request.target,
        "raw_path": request.target.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in request.headers],
    }


def raw_app(messages: list[dict[str, Any]], calls: Calls) -> Any:
    async def app(scope: Any, receive: Any, send_: Any) -> None:
        calls.n += 1
        for message in messages:
            await send_(message)

    return app


@pytest.mark.parametrize(
    "messages",
    [
        # the app stops half-way: no final body message
        [
            {"type": "http.response.start", "status": 200, "headers": []},
            {"type": "http.response.body", "body": b"half", "more_body": True},
        ],
        # trailers cannot be covered by the signature
        [
            {"type": "http.response.start", "status": 200, "headers": [], "trailers": True},
            {"type": "http.response.body", "body": b"x"},
            {"type": "http.response.trailers", "headers": []},
        ],
        # a Content-Digest that does not match what is sent is never signed
        [
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-digest", content_digest(b"other").encode())],
            },
            {"type": "http.response.body", "body": b"x"},
        ],
        # ... not even with an empty body (the client checks it against b"")
        [
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-digest", content_digest(b"other").encode())],
            },
            {"type": "http.response.body", "body": b""},
        ],
    ],
    ids=["incomplete", "trailers", "lying-digest", "lying-digest-empty-body"],
)
def test_asgi_response_that_cannot_be_signed_is_500(
    store: MemoryKeyStore,
    bundles: BundleSet,
    web_wit: str,
    api_signer: ResponseSigner,
    messages: list[dict[str, Any]],
) -> None:
    calls = Calls()
    request = signed_request(store, web_wit)
    mw = WimseASGIMiddleware(
        raw_app(messages, calls),
        build_request_verifier(bundles, [ORIGIN]),
        response_signer=api_signer,
        verify_in_thread=False,
    )
    sent = run_asgi(mw, http_scope(request), [{"type": "http.request", "body": request.body}])
    assert calls.n == 1
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 500
    assert json.loads(sent[1]["body"])["code"] == "response_signing_failed"
    assert len(sent) == 2


def test_asgi_lowercase_method_is_kept_as_received(
    store: MemoryKeyStore, bundles: BundleSet, web_wit: str
) -> None:
    """RFC 9110: methods are case-sensitive. A signature over GET must not
    verify a request whose method is "get"."""
    calls = Calls()
    request = signed_request(store, web_wit, "/pay", b"", ask=False, method="GET")
    scope = http_scope(request)
    scope["method"] = "get"
    mw = WimseASGIMiddleware(
        raw_app([], calls), build_request_verifier(bundles, [ORIGIN]), verify_in_thread=False
    )
    sent = run_asgi(mw, scope, [{"type": "http.request", "body": b""}])
    assert sent[0]["status"] == 400
    assert json.loads(sent[1]["body"])["code"] == "signature_invalid"
    assert calls.n == 0


def test_response_limits_are_checked() -> None:
    async def app(scope: Any, receive: Any, send_: Any) -> None:
        raise AssertionError

    with pytest.raises(ValueError):
        WimseASGIMiddleware(app, object(), max_response=-1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        WimseWSGIMiddleware(lambda e, s: [], object(), max_response=-1)  # type: ignore[arg-type]


# -- WSGI ------------------------------------------------------------------------------


def flask_app(verifier: RequestVerifier, calls: Calls, **kw: Any) -> Flask:
    from flask import request as flask_request

    app = Flask("wimse-signed-responses")

    @app.route("/pay", methods=["GET", "POST"])
    def pay() -> dict[str, str]:
        calls.n += 1
        return {"got": flask_request.get_data(as_text=True)}

    @app.route("/big", methods=["GET", "POST"])
    def big() -> str:
        calls.n += 1
        return "x" * 5000

    app.wsgi_app = WimseWSGIMiddleware(app.wsgi_app, verifier, **kw)  # type: ignore[method-assign]
    return app


def wsgi_send(client: Any, request: HttpMessage) -> Any:
    return client.open(
        request.target,
        base_url=ORIGIN,
        method=request.method,
        headers=list(request.headers),
        data=request.body or b"",
    )


def wsgi_message(got: Any) -> HttpMessage:
    return HttpMessage.response(got.status_code, list(got.headers.items()), got.get_data())


def test_wsgi_signs_the_response_the_caller_asked_for(
    store: MemoryKeyStore, bundles: BundleSet, web_wit: str, api_signer: ResponseSigner
) -> None:
    calls = Calls()
    app = flask_app(build_request_verifier(bundles, [ORIGIN]), calls, response_signer=api_signer)
    request = signed_request(store, web_wit)
    got = wsgi_send(app.test_client(), request)
    assert got.status_code == 200, got.data
    assert got.json == {"got": '{"amount": 1}'}
    result = client_verifier(bundles).verify_response(wsgi_message(got), request)
    assert result is not None and result.subject == str(API)
    assert calls.n == 1


def test_wsgi_asked_without_a_signer_is_refused_before_the_app(
    store: MemoryKeyStore, bundles: BundleSet, web_wit: str
) -> None:
    calls = Calls()
    app = flask_app(build_request_verifier(bundles, [ORIGIN]), calls)
    got = wsgi_send(app.test_client(), signed_request(store, web_wit))
    assert got.status_code == 400
    assert got.json["code"] == "signed_response_unavailable" and set(got.json) == PROBLEM_KEYS
    assert "signature" not in got.headers
    assert calls.n == 0


def test_wsgi_response_over_the_limit_is_500_not_an_unsigned_success(
    store: MemoryKeyStore, bundles: BundleSet, web_wit: str, api_signer: ResponseSigner
) -> None:
    calls = Calls()
    app = flask_app(
        build_request_verifier(bundles, [ORIGIN]),
        calls,
        response_signer=api_signer,
        max_response=4096,
    )
    got = wsgi_send(app.test_client(), signed_request(store, web_wit, "/big", b""))
    assert got.status_code == 500 and got.json["code"] == "response_too_large"
    assert "signature" not in got.headers
    assert calls.n == 1


def test_wsgi_unasked_response_goes_out_as_the_app_made_it(
    store: MemoryKeyStore, bundles: BundleSet, web_wit: str, api_signer: ResponseSigner
) -> None:
    app = flask_app(
        build_request_verifier(bundles, [ORIGIN]),
        Calls(),
        response_signer=api_signer,
        max_response=16,
    )
    request = signed_request(store, web_wit, ask=False)
    got = wsgi_send(app.test_client(), request)
    assert got.status_code == 200 and "signature" not in got.headers
    assert client_verifier(bundles).verify_response(wsgi_message(got), request) is None


def wsgi_environ(request: HttpMessage) -> dict[str, Any]:
    assert request.method is not None and request.target is not None
    body = request.body or b""
    environ: dict[str, Any] = {
        "REQUEST_METHOD": request.method,
        "SCRIPT_NAME": "",
        "PATH_INFO": request.target,
        "QUERY_STRING": "",
        "SERVER_NAME": "api.example.org",
        "SERVER_PORT": "443",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.url_scheme": "https",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": io.StringIO(),
        "wsgi.version": (1, 0),
    }
    for k, v in request.headers:
        if k.lower() == "content-type":
            environ["CONTENT_TYPE"] = v
        else:
            environ["HTTP_" + k.upper().replace("-", "_")] = v
    return environ


def test_wsgi_streaming_app_with_write_and_close_is_signed_whole(
    store: MemoryKeyStore, bundles: BundleSet, web_wit: str, api_signer: ResponseSigner
) -> None:
    """A generator app that also uses the legacy write() callable: every byte
    is covered, and the app's iterable is closed."""
    closed: list[bool] = []

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            yield b"two "
            yield b"three"

        def close(self) -> None:
            closed.append(True)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        write = start_response("201 Created", [("Content-Type", "text/plain")])
        write(b"one ")
        return Body()

    request = signed_request(store, web_wit)
    mw = WimseWSGIMiddleware(
        app, build_request_verifier(bundles, [ORIGIN]), response_signer=api_signer
    )
    started: list[tuple[str, list[tuple[str, str]]]] = []

    def start_response(status: str, headers: list[tuple[str, str]], *exc: Any) -> Any:
        started.append((status, headers))
        return lambda _: None

    body = b"".join(mw(wsgi_environ(request), start_response))
    assert body == b"one two three" and closed == [True]
    status, headers = started[0]
    assert status == "201 Created"
    response = HttpMessage.response(201, headers, body)
    assert client_verifier(bundles).verify_response(response, request) is not None


def test_wsgi_lowercase_method_is_kept_as_received(
    store: MemoryKeyStore, bundles: BundleSet, web_wit: str
) -> None:
    request = signed_request(store, web_wit, "/pay", b"", ask=False, method="GET")
    environ = wsgi_environ(request)
    environ["REQUEST_METHOD"] = "get"

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        raise AssertionError("the app must not be called")

    mw = WimseWSGIMiddleware(app, build_request_verifier(bundles, [ORIGIN]))
    statuses: list[str] = []
    body = b"".join(mw(environ, lambda s, h, *e: statuses.append(s)))
    assert statuses[0].startswith("400")
    assert json.loads(body)["code"] == "signature_invalid"
