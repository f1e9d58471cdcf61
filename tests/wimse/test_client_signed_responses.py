"""Clients check signed responses (issue 7, item 4; httpsig "Signing the Response").

``WimseAuth`` (httpx, sync and async) and ``WimseRequestsAuth`` ask for a signed
response (``wimse-sign-response``) when told to, verify every signed response
they receive, and refuse an unsigned answer to a request that asked for one.
The servers are the real middlewares signing with a real ``ResponseSigner``:

- httpx sync  -> Flask behind WimseWSGIMiddleware over ``httpx.WSGITransport``;
- httpx async -> Starlette behind WimseASGIMiddleware over ``httpx.ASGITransport``;
- requests    -> Flask behind WimseWSGIMiddleware on a real werkzeug HTTP server.

Between client and middleware sits a "man in the middle" (a WSGI / ASGI layer
outside the middleware) that changes the status, changes the body, strips the
signature or passes everything through; each change must be refused, and so
must a correct signature by an identity other than the expected responder.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import requests
from flask import Flask
from flask import request as flask_request
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from werkzeug.serving import make_server
from wimse_rig import ca_bundles
from wimse_rig import mint_example_wit as mint

from custos.bundle import BundleSet, TrustBundle
from custos.identity import SpiffeId
from custos.integrations.asgi import WimseASGIMiddleware
from custos.integrations.auth import (
    ClientAuthError,
    ResponderMismatchError,
    WimseAuth,
    WimseRequestsAuth,
)
from custos.integrations.wsgi import WimseWSGIMiddleware
from custos.keys.software import MemoryKeyStore
from custos.wimse.errors import WimseError
from custos.wimse.httpsig import ResponseSigner
from custos.wimse.signer import LocalProofSigner
from custos.wimse.verifier import build_request_verifier

WEB = SpiffeId.parse("spiffe://example.org/ns/shop/sa/web")
API = SpiffeId.parse("spiffe://example.org/ns/shop/sa/api")
OTHER = "spiffe://example.org/ns/shop/sa/not-api"
ORIGIN = "https://api.example.org"
TAMPERINGS = ["status", "body", "strip", "none"]

Tamper = Callable[[int, list[tuple[str, str]], bytes], tuple[int, list[tuple[str, str]], bytes]]


def tamper_with(kind: str) -> Tamper:
    """What the man in the middle does to a response."""

    def change(
        status: int, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        if kind == "status":
            return 201, headers, body
        if kind == "body":
            changed = body.replace(b"web", b"evil")
            assert changed != body
            return status, headers, changed
        if kind == "strip":
            dropped = {"signature", "signature-input"}
            return status, [(k, v) for k, v in headers if k.lower() not in dropped], body
        return status, headers, body

    return change


@pytest.fixture(scope="module")
def store() -> MemoryKeyStore:
    s = MemoryKeyStore()
    s.create("ca", "ES256")
    s.create("web", "ES256")
    s.create("api", "ES256")
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


def auth_kwargs(bundles: BundleSet | TrustBundle, **over: Any) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "variant": "http-signature",
        "bundles": bundles,
        "require_signed_response": True,
        "expected_responder": str(API),
    }
    kw.update(over)
    return kw


# -- the servers, with a man in the middle outside the middleware --------------------------


def flask_app(
    bundles: BundleSet, origin: str, signer: ResponseSigner | None, tamper: Tamper
) -> Any:
    app = Flask("signed-responses")

    @app.route("/pay", methods=["GET", "POST"])
    def pay() -> dict[str, str]:
        return {"sub": flask_request.environ["custos.caller"].subject}

    verifier = build_request_verifier(bundles, [origin])
    inner = WimseWSGIMiddleware(app.wsgi_app, verifier, response_signer=signer)

    def mitm(environ: dict[str, Any], start_response: Any) -> Any:
        seen: dict[str, Any] = {}

        def keep(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            seen["status"], seen["headers"] = status, headers
            return lambda data: None

        body = b"".join(inner(environ, keep))
        code, headers, body = tamper(int(seen["status"][:3]), list(seen["headers"]), body)
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        headers.append(("Content-Length", str(len(body))))
        start_response(f"{code} X", headers)
        return [body]

    return mitm


def starlette_app(bundles: BundleSet, signer: ResponseSigner | None, tamper: Tamper) -> Any:
    async def pay(request: Request) -> JSONResponse:
        return JSONResponse({"sub": request.state.wimse_caller.subject})

    app = Starlette(routes=[Route("/pay", pay, methods=["GET", "POST"])])
    inner = WimseASGIMiddleware(
        app, build_request_verifier(bundles, [ORIGIN]), response_signer=signer
    )

    async def mitm(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await inner(scope, receive, send)
            return
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def keep(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            else:
                chunks.append(message.get("body", b""))

        await inner(scope, receive, keep)
        headers = [(k.decode(), v.decode()) for k, v in start["headers"]]
        code, headers, body = tamper(start["status"], headers, b"".join(chunks))
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        headers.append(("content-length", str(len(body))))
        raw = [(k.encode(), v.encode()) for k, v in headers]
        await send({"type": "http.response.start", "status": code, "headers": raw})
        await send({"type": "http.response.body", "body": body})

    return mitm


@pytest.fixture
def http_server(bundles: BundleSet) -> Iterator[Callable[[ResponseSigner | None, Tamper], str]]:
    """Start real werkzeug servers; yields a factory returning each one's origin."""
    started: list[tuple[Any, threading.Thread]] = []

    def start(signer: ResponseSigner | None, tamper: Tamper) -> str:
        holder: dict[str, Any] = {}

        def app(environ: dict[str, Any], start_response: Any) -> Any:
            return holder["app"](environ, start_response)

        server = make_server("127.0.0.1", 0, app, threaded=True)
        origin = f"http://127.0.0.1:{server.server_port}"
        holder["app"] = flask_app(bundles, origin, signer, tamper)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        started.append((server, thread))
        return origin

    try:
        yield start
    finally:
        for server, thread in started:
            server.shutdown()
            thread.join(timeout=10)
            server.server_close()


def expect(tampering: str) -> str | None:
    """The code each change is refused with (None: accepted)."""
    return {
        "status": "signature_invalid",
        "body": "content_digest_mismatch",
        "strip": "signed_response_missing",
        "none": None,
    }[tampering]


def check_outcome(call: Callable[[], Any], tampering: str) -> None:
    code = expect(tampering)
    if code is None:
        got = call()
        assert got.status_code == 200
        assert got.json() == {"sub": str(WEB)}
        return
    with pytest.raises(WimseError) as err:
        call()
    if tampering == "body":
        # the digest or the signature: either way the body is not what was signed
        assert err.value.code in ("content_digest_mismatch", "signature_invalid")
    else:
        assert err.value.code == code


# -- httpx sync over WSGITransport ---------------------------------------------------------


@pytest.mark.parametrize("tampering", TAMPERINGS)
def test_httpx_sync_checks_signed_responses(
    tampering: str,
    store: MemoryKeyStore,
    bundles: BundleSet,
    web_wit: str,
    api_signer: ResponseSigner,
) -> None:
    app = flask_app(bundles, ORIGIN, api_signer, tamper_with(tampering))
    auth = WimseAuth.from_key(store.get("web"), web_wit, **auth_kwargs(bundles))
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url=ORIGIN, auth=auth) as c:
        check_outcome(lambda: c.post("/pay", json={"a": 1}), tampering)


# -- httpx async over ASGITransport --------------------------------------------------------


@pytest.mark.parametrize("tampering", TAMPERINGS)
def test_httpx_async_checks_signed_responses(
    tampering: str,
    store: MemoryKeyStore,
    bundles: BundleSet,
    web_wit: str,
    api_signer: ResponseSigner,
) -> None:
    app = starlette_app(bundles, api_signer, tamper_with(tampering))
    auth = WimseAuth.from_key(store.get("web"), web_wit, **auth_kwargs(bundles))

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=ORIGIN, auth=auth) as c:
            return await c.post("/pay", json={"a": 1})

    check_outcome(lambda: asyncio.run(call()), tampering)


# -- requests over real HTTP ---------------------------------------------------------------


@pytest.mark.parametrize("tampering", TAMPERINGS)
def test_requests_checks_signed_responses(
    tampering: str,
    store: MemoryKeyStore,
    bundles: BundleSet,
    web_wit: str,
    api_signer: ResponseSigner,
    http_server: Callable[[ResponseSigner | None, Tamper], str],
) -> None:
    origin = http_server(api_signer, tamper_with(tampering))
    auth = WimseRequestsAuth.from_key(store.get("web"), web_wit, **auth_kwargs(bundles))
    check_outcome(
        lambda: requests.post(f"{origin}/pay", json={"a": 1}, auth=auth, timeout=10), tampering
    )


# -- the expected responder ------------------------------------------------------------------


def test_wrong_responder_is_refused_by_every_client(
    store: MemoryKeyStore,
    bundles: BundleSet,
    web_wit: str,
    api_signer: ResponseSigner,
    http_server: Callable[[ResponseSigner | None, Tamper], str],
) -> None:
    kw = auth_kwargs(bundles, expected_responder=OTHER)
    wsgi = flask_app(bundles, ORIGIN, api_signer, tamper_with("none"))
    auth = WimseAuth.from_key(store.get("web"), web_wit, **kw)
    with httpx.Client(transport=httpx.WSGITransport(app=wsgi), base_url=ORIGIN, auth=auth) as c:
        with pytest.raises(ResponderMismatchError) as err:
            c.post("/pay", json={})
    assert err.value.code == "unexpected_responder"

    asgi = starlette_app(bundles, api_signer, tamper_with("none"))

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=asgi)
        async with httpx.AsyncClient(transport=transport, base_url=ORIGIN, auth=auth) as c:
            return await c.post("/pay", json={})

    with pytest.raises(ResponderMismatchError):
        asyncio.run(call())

    origin = http_server(api_signer, tamper_with("none"))
    rauth = WimseRequestsAuth.from_key(store.get("web"), web_wit, **kw)
    with pytest.raises(ResponderMismatchError):
        requests.post(f"{origin}/pay", json={}, auth=rauth, timeout=10)


@pytest.mark.parametrize(
    "expected",
    [str(API), "spiffe://example.org", "spiffe://example.org/ns/shop/*", [OTHER, str(API)]],
)
def test_expected_responder_takes_policy_patterns(
    expected: Any,
    store: MemoryKeyStore,
    bundles: BundleSet,
    web_wit: str,
    api_signer: ResponseSigner,
) -> None:
    app = flask_app(bundles, ORIGIN, api_signer, tamper_with("none"))
    auth = WimseAuth.from_key(
        store.get("web"), web_wit, **auth_kwargs(bundles, expected_responder=expected)
    )
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url=ORIGIN, auth=auth) as c:
        assert c.post("/pay", json={}).status_code == 200


def test_responder_from_another_trust_domain_pattern_is_refused(
    store: MemoryKeyStore, bundles: BundleSet, web_wit: str, api_signer: ResponseSigner
) -> None:
    app = flask_app(bundles, ORIGIN, api_signer, tamper_with("none"))
    kw = auth_kwargs(bundles, expected_responder="spiffe://other.org")
    auth = WimseAuth.from_key(store.get("web"), web_wit, **kw)
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url=ORIGIN, auth=auth) as c:
        with pytest.raises(ResponderMismatchError):
            c.post("/pay", json={})


# -- what the client asks for and refuses by itself -------------------------------------------


def test_the_request_asks_for_a_signed_response(
    store: MemoryKeyStore, bundles: BundleSet, web_wit: str
) -> None:
    """Without a response signer the server answers 400 signed_response_unavailable,
    which shows that the request asked; the unsigned 400 is itself refused."""
    app = flask_app(bundles, ORIGIN, None, tamper_with("none"))
    auth = WimseAuth.from_key(store.get("web"), web_wit, **auth_kwargs(bundles))
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url=ORIGIN, auth=auth) as c:
        with pytest.raises(WimseError) as err:
            c.post("/pay", json={})
    assert err.value.code == "signed_response_missing"


def test_not_required_unsigned_is_fine_but_a_bad_signature_is_not(
    store: MemoryKeyStore, bundles: BundleSet, web_wit: str, api_signer: ResponseSigner
) -> None:
    """With a verifier and no requirement, unsigned answers pass; signed ones are checked."""
    plain = flask_app(bundles, ORIGIN, api_signer, tamper_with("none"))
    auth = WimseAuth.from_key(store.get("web"), web_wit, variant="http-signature", bundles=bundles)
    with httpx.Client(transport=httpx.WSGITransport(app=plain), base_url=ORIGIN, auth=auth) as c:
        assert c.post("/pay", json={}).status_code == 200


def test_signer_that_does_not_ask_is_refused_before_sending(
    store: MemoryKeyStore, bundles: BundleSet, web_wit: str
) -> None:
    signer = LocalProofSigner(store.get("web"), web_wit)  # sign_response=False
    sent: list[httpx.Request] = []
    auth = WimseAuth(
        signer, variant="http-signature", response_verifier=bundles, require_signed_response=True
    )
    transport = httpx.MockTransport(lambda r: sent.append(r) or httpx.Response(204))
    with httpx.Client(transport=transport, auth=auth) as c, pytest.raises(ClientAuthError) as err:
        c.get(f"{ORIGIN}/pay")
    assert err.value.code == "sign_response_not_requested" and sent == []


def test_a_signed_response_without_a_verifier_is_refused(
    store: MemoryKeyStore, web_wit: str
) -> None:
    """Verify every signed response: one that cannot be verified is not taken."""
    signer = LocalProofSigner(store.get("web"), web_wit)
    auth = WimseAuth(signer, variant="http-signature")
    forged = httpx.Response(200, headers={"Signature-Input": "x=()", "Signature": "x=:AA==:"})
    with httpx.Client(transport=httpx.MockTransport(lambda r: forged), auth=auth) as c:
        with pytest.raises(WimseError) as err:
            c.get(f"{ORIGIN}/pay")
    assert err.value.code == "response_not_verifiable"


@pytest.mark.parametrize(
    "kw",
    [
        {"require_signed_response": True},
        {"expected_responder": str(API)},
        {"response_verifier": "bundles"},
    ],
)
def test_response_options_need_the_http_signature_variant(
    kw: dict[str, Any], store: MemoryKeyStore, bundles: BundleSet, web_wit: str
) -> None:
    if kw.get("response_verifier") == "bundles":
        kw = {"response_verifier": bundles}
    signer = LocalProofSigner(store.get("web"), web_wit)
    for cls in (WimseAuth, WimseRequestsAuth):
        with pytest.raises(ClientAuthError) as err:
            cls(signer, variant="wpt", **kw)
        assert err.value.code == "responses_need_http_signature"


def test_requirement_without_a_verifier_is_a_config_error(
    store: MemoryKeyStore, web_wit: str
) -> None:
    signer = LocalProofSigner(store.get("web"), web_wit, sign_response=True)
    with pytest.raises(ClientAuthError) as err:
        WimseAuth(signer, variant="http-signature", require_signed_response=True)
    assert err.value.code == "response_verifier_missing"
    with pytest.raises(ClientAuthError) as err:
        WimseAuth(signer, variant="http-signature", response_verifier=object())  # type: ignore[arg-type]
    assert err.value.code == "response_verifier_invalid"
    with pytest.raises(ClientAuthError) as err:
        WimseAuth(signer, variant="http-signature", response_verifier=None, expected_responder="x")


# -- hostile responses: a clear WimseError, never another exception ---------------------------

HOSTILE_RESPONSES: dict[str, list[tuple[bytes, bytes]]] = {
    "latin1_signature_input": [
        (b"signature-input", b'wimse=(\xff);tag="wimse-workload-to-workload"')
    ],
    "latin1_wit": [
        (b"workload-identity-token", b"\xff\xfe.e30.x"),
        (b"signature-input", b'wimse=("@status");tag="wimse-workload-to-workload"'),
        (b"signature", b"wimse=:AAAA:"),
    ],
    "huge_signature": [
        (b"signature-input", b"a=(" + b'"x" ' * 50_000 + b")"),
        (b"signature", b"a=:AA==:"),
    ],
    "signature_only": [(b"signature", b"wimse=:AAAA:")],
    "two_wimse_signatures": [
        (
            b"signature-input",
            b'a=();tag="wimse-workload-to-workload", b=();tag="wimse-workload-to-workload"',
        ),
        (b"signature", b"a=:AA==:, b=:AA==:"),
    ],
}


@pytest.mark.parametrize("case", list(HOSTILE_RESPONSES))
def test_hostile_signed_response_is_a_clear_error(
    case: str, store: MemoryKeyStore, bundles: BundleSet, web_wit: str
) -> None:
    auth = WimseAuth.from_key(store.get("web"), web_wit, variant="http-signature", bundles=bundles)

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=HOSTILE_RESPONSES[case], content=b"{}")

    with httpx.Client(transport=httpx.MockTransport(answer), auth=auth) as client:
        with pytest.raises(WimseError):
            client.get(f"{ORIGIN}/pay")


def test_one_trust_bundle_is_enough_to_check_responses(
    store: MemoryKeyStore, bundles: BundleSet, web_wit: str, api_signer: ResponseSigner
) -> None:
    from wimse_rig import TD

    bundle = bundles.get(TD)
    assert bundle is not None
    app = flask_app(bundles, ORIGIN, api_signer, tamper_with("status"))
    auth = WimseAuth.from_key(store.get("web"), web_wit, **auth_kwargs(bundle))
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url=ORIGIN, auth=auth) as c:
        with pytest.raises(WimseError) as err:
            c.post("/pay", json={})
    assert err.value.code == "signature_invalid"
