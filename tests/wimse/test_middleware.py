"""The relying-party middleware, ASGI and WSGI: every refusal path and the
policy, driven through real frameworks (Starlette's TestClient, raw ASGI
calls for what a client library cannot do, Flask's test client).

- no WIT -> 400; bad WPT -> 401 + WWW-Authenticate: WPT; replay -> 401 (WPT)
  or 400 (HTTP signature); policy -> 403; body over the limit -> 413 (declared
  or streamed); client gone mid-body -> app not called, nothing sent;
- problem bodies hold type/title/status/code and nothing else; tokens never
  reach the response or the log;
- the policy judges the decoded path the router uses (/%70ay is /pay);
- a pinned clock pins the replay cache too (replays are caught under --now).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
from flask import Flask
from flask import request as flask_request
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect
from wimse_rig import Calls, ca_bundles, run_asgi
from wimse_rig import mint_example_wit as mint

from custos.bundle import BundleSet
from custos.identity import SpiffeId
from custos.integrations.asgi import WimseASGIMiddleware
from custos.integrations.auth import WimseAuth
from custos.integrations.wsgi import WimseWSGIMiddleware, caller_of
from custos.keys.jose import joserfc_key
from custos.keys.software import MemoryKeyStore
from custos.wimse.errors import MalformedRequestError
from custos.wimse.policy import CallerPolicy
from custos.wimse.signer import LocalProofSigner
from custos.wimse.verifier import RequestVerifier, build_request_verifier
from custos.wimse.wit import mint_wit
from custos.wimse.wpt import create_wpt, wpt_headers

WEB = SpiffeId.parse("spiffe://example.org/ns/shop/sa/web")
BILLING = SpiffeId.parse("spiffe://example.org/ns/finance/sa/billing")
ORIGIN = "https://api.example.org"
POLICY = CallerPolicy.from_mapping(
    {
        "/pay": ["spiffe://example.org/ns/shop/*"],
        "/payroll": [str(BILLING)],
        "/": ["spiffe://example.org"],
    }
)
PROBLEM_KEYS = {"type", "title", "status", "code"}


# -- rig --


@pytest.fixture
def store() -> MemoryKeyStore:
    s = MemoryKeyStore()
    s.create("ca", "ES256")
    s.create("web", "ES256")
    s.create("billing", "ES256")
    s.create("stranger", "ES256")
    return s


@pytest.fixture
def bundles(store: MemoryKeyStore) -> BundleSet:
    return ca_bundles(store)


@pytest.fixture
def web(store: MemoryKeyStore) -> LocalProofSigner:
    return LocalProofSigner(store.get("web"), mint(store, WEB, "web"))


@pytest.fixture
def billing(store: MemoryKeyStore) -> LocalProofSigner:
    return LocalProofSigner(store.get("billing"), mint(store, BILLING, "billing"))


def starlette_app(verifier: RequestVerifier, calls: Calls, **kw: Any) -> WimseASGIMiddleware:
    async def handler(request: Request) -> JSONResponse:
        calls.n += 1
        caller = request.state.wimse_caller
        return JSONResponse({"sub": caller.subject, "path": request.url.path})

    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(websocket.state.wimse_caller.subject)
        await websocket.close()

    app = Starlette(
        routes=[
            Route("/pay", handler, methods=["GET", "POST"]),
            Route("/payroll", handler, methods=["GET", "POST"]),
            Route("/other", handler, methods=["GET", "POST"]),
            Route("/health", health),
            WebSocketRoute("/ws", ws),
        ]
    )
    kw.setdefault("policy", POLICY)
    return WimseASGIMiddleware(app, verifier, exempt_paths=["/health"], **kw)


@pytest.fixture
def calls() -> Calls:
    return Calls()


@pytest.fixture
def client(bundles: BundleSet, calls: Calls) -> TestClient:
    return TestClient(
        starlette_app(build_request_verifier(bundles, [ORIGIN]), calls, max_body=64),
        base_url=ORIGIN,
    )


def signed_headers(
    signer: LocalProofSigner, method: str, url: str, body: bytes = b"", variant: Any = "wpt"
) -> dict[str, str]:
    """The headers WimseAuth would send, captured without sending anything."""
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    auth = WimseAuth(signer, variant=variant)
    with httpx.Client(transport=httpx.MockTransport(record), auth=auth) as c:
        c.request(method, url, content=body)
    return {k: v for k, v in seen[0].headers.items() if k not in ("host", "content-length")}


def forge(authorization: str) -> str:
    """``Authorization: WPT <jwt>`` with one signature character changed
    (canonical base64url still, so it is the signature check that fails)."""
    scheme, _, wpt = authorization.partition(" ")
    head, payload, sig = wpt.split(".")
    sig = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
    return f"{scheme} {head}.{payload}.{sig}"


def assert_problem(got: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert got.status_code == status, got.text
    assert got.headers["content-type"] == "application/problem+json"
    doc: dict[str, Any] = got.json()
    assert set(doc) == PROBLEM_KEYS
    assert doc["status"] == status and doc["code"] == code
    assert doc["type"] == f"urn:custos:problem:{code}"
    return doc


# -- refusals (ASGI) --


def test_success_puts_the_caller_on_the_request(
    client: TestClient, web: LocalProofSigner, calls: Calls
) -> None:
    client.auth = WimseAuth(web)
    got = client.get("/pay")
    assert got.status_code == 200
    assert got.json() == {"sub": str(WEB), "path": "/pay"}
    assert calls.n == 1


def test_no_wit_is_400(client: TestClient, calls: Calls) -> None:
    got = client.get("/pay")
    assert_problem(got, 400, "wit_missing")
    assert "www-authenticate" not in got.headers
    assert calls.n == 0


def test_bad_wpt_is_401_with_challenge(
    client: TestClient, web: LocalProofSigner, calls: Calls
) -> None:
    headers = signed_headers(web, "GET", f"{ORIGIN}/pay")
    headers["authorization"] = forge(headers["authorization"])
    got = client.get("/pay", headers=headers)
    assert_problem(got, 401, "wpt_bad_signature")
    assert got.headers["www-authenticate"] == "WPT"
    assert calls.n == 0


def test_proof_by_another_key_is_401(
    store: MemoryKeyStore, client: TestClient, web: LocalProofSigner
) -> None:
    """Someone holding web's WIT (it is not secret) but not web's key."""
    thief = LocalProofSigner(store.get("stranger"), web.wit())
    with pytest.raises(Exception, match="not the key the WIT binds"):
        thief.wpt(f"{ORIGIN}/pay")
    # Hand-made with the wrong key anyway: the relying party refuses it.
    wit = web.wit()
    bad = create_wpt(joserfc_key(store.get("web")), wit, f"{ORIGIN}/pay")
    other = LocalProofSigner(store.get("web"), mint(store, BILLING, "billing"))
    headers = dict(wpt_headers(other.wit(), bad))
    assert_problem(client.get("/pay", headers=headers), 401, "wpt_bad_signature")


def test_bad_wit_is_400(store: MemoryKeyStore, client: TestClient, web: LocalProofSigner) -> None:
    headers = signed_headers(web, "GET", f"{ORIGIN}/pay")
    # A WIT signed by a key the bundle does not hold.
    store.create("rogue-ca", "ES256")
    rogue = mint_wit(
        joserfc_key(store.get("rogue-ca")),
        "ES256",
        "ca-1",
        WEB,
        store.public_jwk("web"),
        timedelta(minutes=5),
    )
    headers["workload-identity-token"] = rogue
    got = client.get("/pay", headers=headers)
    assert_problem(got, 400, "wit_bad_signature")
    assert "www-authenticate" not in got.headers


def test_replayed_wpt_is_401(client: TestClient, web: LocalProofSigner, calls: Calls) -> None:
    headers = signed_headers(web, "GET", f"{ORIGIN}/pay")
    assert client.get("/pay", headers=headers).status_code == 200
    got = client.get("/pay", headers=headers)
    assert_problem(got, 401, "wpt_replayed")
    assert got.headers["www-authenticate"] == "WPT"
    assert calls.n == 1


def test_replayed_http_signature_is_refused(
    client: TestClient, web: LocalProofSigner, calls: Calls
) -> None:
    headers = signed_headers(web, "POST", f"{ORIGIN}/pay", b"{}", variant="http-signature")
    assert client.post("/pay", headers=headers, content=b"{}").status_code == 200
    # Not a WPT failure, so 400 without a WPT challenge.
    got = client.post("/pay", headers=headers, content=b"{}")
    assert_problem(got, 400, "replayed_proof")
    assert "www-authenticate" not in got.headers
    assert calls.n == 1


def test_signed_body_swapped_is_refused(
    client: TestClient, web: LocalProofSigner, calls: Calls
) -> None:
    headers = signed_headers(web, "POST", f"{ORIGIN}/pay", b'{"amount":1}', "http-signature")
    got = client.post("/pay", headers=headers, content=b'{"amount":9}')
    assert got.status_code == 400
    assert got.json()["code"].startswith("content_digest")
    assert calls.n == 0


def test_both_variants_at_once_is_ambiguous(client: TestClient, web: LocalProofSigner) -> None:
    headers = signed_headers(web, "GET", f"{ORIGIN}/pay", variant="http-signature")
    wpt_form = signed_headers(web, "GET", f"{ORIGIN}/pay")
    headers["authorization"] = wpt_form["authorization"]
    assert_problem(client.get("/pay", headers=headers), 400, "ambiguous_proof")


def test_body_over_the_limit_is_413(
    client: TestClient, web: LocalProofSigner, calls: Calls
) -> None:
    client.auth = WimseAuth(web)
    assert client.post("/pay", content=b"x" * 64).status_code == 200
    assert_problem(client.post("/pay", content=b"x" * 65), 413, "body_too_large")
    assert calls.n == 1


def http_scope(path: str, headers: dict[str, str], method: str = "POST") -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "https",
        "server": ("api.example.org", 443),
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }


def test_streamed_body_over_the_limit_is_413(
    bundles: BundleSet, calls: Calls, web: LocalProofSigner
) -> None:
    """No Content-Length (chunked): the limit still holds, counted as chunks arrive."""
    app = starlette_app(build_request_verifier(bundles, [ORIGIN]), calls, max_body=64)
    headers = signed_headers(web, "POST", f"{ORIGIN}/pay")
    chunks = [{"type": "http.request", "body": b"x" * 40, "more_body": True}] * 2
    sent = run_asgi(app, http_scope("/pay", headers), chunks)
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["code"] == "body_too_large"
    assert calls.n == 0


def test_client_disconnect_mid_body_never_reaches_the_app(
    bundles: BundleSet, calls: Calls, web: LocalProofSigner
) -> None:
    app = starlette_app(build_request_verifier(bundles, [ORIGIN]), calls)
    headers = signed_headers(web, "POST", f"{ORIGIN}/pay", b"abcdef")
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": b"abc", "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent = run_asgi(app, http_scope("/pay", headers), messages)
    assert calls.n == 0
    assert sent == []  # nobody to answer
    # The same request delivered whole does reach the app (the test can fail).
    whole = [{"type": "http.request", "body": b"abcdef", "more_body": False}]
    sent = run_asgi(app, http_scope("/pay", headers), whole)
    assert sent[0]["status"] == 200 and calls.n == 1


def test_exempt_path_and_lifespan_pass_through(client: TestClient) -> None:
    with client:  # runs lifespan startup/shutdown through the middleware
        assert client.get("/health").text == "ok"


def test_websocket_handshake_is_verified(client: TestClient, web: LocalProofSigner) -> None:
    with pytest.raises(WebSocketDisconnect) as info, client.websocket_connect("/ws"):
        pass
    assert info.value.code == 1008
    headers = signed_headers(web, "GET", f"{ORIGIN}/ws")
    with client.websocket_connect("/ws", headers=headers) as ws:
        assert ws.receive_text() == str(WEB)


# -- policy --


def test_policy_allowed_and_denied_routes(
    client: TestClient, web: LocalProofSigner, billing: LocalProofSigner, calls: Calls
) -> None:
    client.auth = WimseAuth(web)
    assert client.get("/pay").status_code == 200
    got = client.get("/payroll")  # /pay's rule does not cover /payroll
    assert_problem(got, 403, "caller_not_allowed")
    assert client.get("/other").status_code == 200  # "/" lets the trust domain in
    client.auth = WimseAuth(billing)
    assert client.get("/payroll").status_code == 200
    assert_problem(client.get("/pay"), 403, "caller_not_allowed")
    assert calls.n == 3


def test_policy_sees_the_decoded_path(
    client: TestClient, billing: LocalProofSigner, calls: Calls
) -> None:
    """/%70ay is routed to the /pay handler; judging the raw path would let
    billing (allowed on "/" but not on /pay) reach it through the "/" rule."""
    client.auth = WimseAuth(billing)
    got = client.get("/%70ay")
    assert_problem(got, 403, "caller_not_allowed")
    assert calls.n == 0


def test_dot_segments_are_refused(
    bundles: BundleSet, calls: Calls, billing: LocalProofSigner
) -> None:
    """A raw target /other/%2e%2e/pay whose decoded path has dot segments that
    some router could resolve to /pay: refused (the origin rules refuse the
    encoded dots, and the routing check the decoded ones), never judged
    under the "/" rule. No client signs such a target, so the proof is one
    made for /pay."""
    app = starlette_app(build_request_verifier(bundles, [ORIGIN]), calls)
    raw = "/other/%2e%2e/pay"
    with pytest.raises(MalformedRequestError):
        signed_headers(billing, "GET", f"{ORIGIN}{raw}", variant="http-signature")
    headers = signed_headers(billing, "GET", f"{ORIGIN}/pay", variant="http-signature")
    scope = http_scope("/other/../pay", headers, "GET")
    scope["raw_path"] = raw.encode()
    done = [{"type": "http.request", "body": b"", "more_body": False}]
    sent = run_asgi(app, scope, done)
    assert sent[0]["status"] == 400
    assert json.loads(sent[1]["body"])["code"] == "unsafe_request_target"
    assert calls.n == 0


def test_default_policy_allows_any_verified_caller(
    bundles: BundleSet, calls: Calls, billing: LocalProofSigner
) -> None:
    app = starlette_app(build_request_verifier(bundles, [ORIGIN]), calls, policy=None)
    with TestClient(app, base_url=ORIGIN) as c:
        c.auth = WimseAuth(billing)
        assert c.get("/pay").status_code == 200


# -- secrecy --


def test_tokens_never_reach_responses_or_logs(
    client: TestClient,
    web: LocalProofSigner,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    good = signed_headers(web, "GET", f"{ORIGIN}/pay")
    forged = dict(good)
    forged["authorization"] = forge(good["authorization"])
    secrets = [
        good["workload-identity-token"],
        good["authorization"][4:],
        forged["authorization"][4:],
    ]
    bodies: list[bytes] = []
    with caplog.at_level(logging.DEBUG):
        bodies.append(client.get("/pay", headers=forged).content)  # bad signature
        bodies.append(client.get("/pay", headers=good).content)  # ok
        bodies.append(client.get("/pay", headers=good).content)  # replay
        bodies.append(
            client.get("/payroll", headers=signed_headers(web, "GET", f"{ORIGIN}/payroll")).content
        )
    logs = [vars(r) for r in caplog.records]  # custos logs through stdlib logging
    refused = [e for e in logs if e.get("event") == "wimse_request_refused"]
    assert [e["code"] for e in refused] == [
        "wpt_bad_signature",
        "wpt_replayed",
        "caller_not_allowed",
    ]
    texts = [repr(logs), caplog.text, *capsys.readouterr(), *(b.decode() for b in bodies)]
    for secret in secrets:
        for piece in secret.split("."):
            for text in texts:
                assert piece not in text


# -- WSGI (Flask) --


def flask_app(verifier: RequestVerifier, calls: Calls, **kw: Any) -> Flask:
    app = Flask("wimse-mw-test")

    @app.route("/pay", methods=["GET", "POST"])
    @app.route("/payroll", methods=["GET", "POST"])
    def handler() -> dict[str, str]:
        calls.n += 1
        caller = caller_of(flask_request.environ)
        assert caller is not None
        return {"sub": caller.subject, "body": flask_request.get_data(as_text=True)}

    kw.setdefault("policy", POLICY)
    app.wsgi_app = WimseWSGIMiddleware(app.wsgi_app, verifier, **kw)  # type: ignore[method-assign]
    return app


@pytest.fixture
def flask_client(bundles: BundleSet, calls: Calls) -> Any:
    return flask_app(build_request_verifier(bundles, [ORIGIN]), calls, max_body=64).test_client()


def wsgi_get(flask_client: Any, path: str, headers: dict[str, str], **kw: Any) -> Any:
    return flask_client.open(path, base_url=ORIGIN, headers=headers, **kw)


@pytest.mark.parametrize("variant", ["wpt", "http-signature"])
def test_wsgi_success(flask_client: Any, web: LocalProofSigner, calls: Calls, variant: Any) -> None:
    headers = signed_headers(web, "POST", f"{ORIGIN}/pay", b"hello", variant)
    got = wsgi_get(flask_client, "/pay", headers, method="POST", data=b"hello")
    assert got.status_code == 200, got.data
    assert got.json == {"sub": str(WEB), "body": "hello"}


def test_wsgi_refusals(
    flask_client: Any, web: LocalProofSigner, billing: LocalProofSigner, calls: Calls
) -> None:
    def problem(got: Any, status: int, code: str) -> None:
        assert got.status_code == status
        assert got.headers["content-type"] == "application/problem+json"
        assert set(got.json) == PROBLEM_KEYS and got.json["code"] == code

    problem(wsgi_get(flask_client, "/pay", {}), 400, "wit_missing")
    good = signed_headers(web, "GET", f"{ORIGIN}/pay")
    forged = dict(good, authorization=forge(good["authorization"]))
    got = wsgi_get(flask_client, "/pay", forged)
    problem(got, 401, "wpt_bad_signature")
    assert got.headers["www-authenticate"] == "WPT"
    assert wsgi_get(flask_client, "/pay", good).status_code == 200
    problem(wsgi_get(flask_client, "/pay", good), 401, "wpt_replayed")
    problem(
        wsgi_get(flask_client, "/payroll", signed_headers(web, "GET", f"{ORIGIN}/payroll")),
        403,
        "caller_not_allowed",
    )
    big = signed_headers(billing, "POST", f"{ORIGIN}/payroll", b"x" * 65)
    problem(
        wsgi_get(flask_client, "/payroll", big, method="POST", data=b"x" * 65),
        413,
        "body_too_large",
    )
    assert calls.n == 1


def test_wsgi_chunked_body_over_the_limit(
    bundles: BundleSet, calls: Calls, billing: LocalProofSigner
) -> None:
    import io

    app = flask_app(build_request_verifier(bundles, [ORIGIN]), calls, max_body=64)
    headers = signed_headers(billing, "POST", f"{ORIGIN}/payroll")
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "POST",
        "SCRIPT_NAME": "",
        "PATH_INFO": "/payroll",
        "QUERY_STRING": "",
        "SERVER_NAME": "api.example.org",
        "SERVER_PORT": "443",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "https",
        "wsgi.input": io.BytesIO(b"y" * 200),
        "wsgi.input_terminated": True,
        "wsgi.errors": io.StringIO(),
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "wsgi.version": (1, 0),
    }
    for k, v in headers.items():
        environ["HTTP_" + k.upper().replace("-", "_")] = v
    status: list[str] = []

    def start_response(s: str, h: list[tuple[str, str]], *exc: Any) -> Callable[[bytes], None]:
        status.append(s)
        return lambda _: None

    body = b"".join(app.wsgi_app(environ, start_response))
    assert status[0].startswith("413")
    assert json.loads(body)["code"] == "body_too_large"
    assert calls.n == 0


def test_wsgi_policy_sees_the_decoded_path(
    flask_client: Any, billing: LocalProofSigner, calls: Calls
) -> None:
    headers = signed_headers(billing, "GET", f"{ORIGIN}/%70ay")
    got = wsgi_get(flask_client, "/%70ay", headers)
    assert got.status_code == 403
    assert calls.n == 0


# -- pinned clock: replay detection still works --


def test_pinned_now_pins_the_replay_cache(store: MemoryKeyStore, bundles: BundleSet) -> None:
    """A verifier with a pinned past "now" (the CLI's --now, tests) must still
    catch a replay: its replay cache has to run on the same pinned clock."""
    pinned = 1745509000
    wit = mint(store, WEB, "web", now=pinned - 10)
    wpt = create_wpt(joserfc_key(store.get("web")), wit, f"{ORIGIN}/pay", now=pinned)
    from custos.wimse.http.message import HttpMessage

    request = HttpMessage.request("GET", "/pay", wpt_headers(wit, wpt))
    verifier = build_request_verifier(bundles, [ORIGIN], now=pinned + 1)
    assert verifier.verify(request).subject == str(WEB)
    with pytest.raises(Exception) as err:
        verifier.verify(request)
    assert getattr(err.value, "code", None) == "wpt_replayed"


# -- replicas sharing a Redis replay cache --


def test_replay_to_another_replica_is_refused_with_redis(
    redis_server: Any, bundles: BundleSet, web: LocalProofSigner, calls: Calls
) -> None:
    """Two relying-party replicas share one redis-server: a proof accepted by
    one is a replay at the other. When Redis goes away, requests fail closed
    with 503 instead of being let through unchecked."""
    from custos.wimse.replay import RedisReplayCache

    def replica() -> TestClient:
        cache = RedisReplayCache(redis_server.client())
        verifier = build_request_verifier(bundles, [ORIGIN], replay=cache)
        return TestClient(starlette_app(verifier, calls), base_url=ORIGIN)

    a, b = replica(), replica()
    expected = {"wpt": (401, "wpt_replayed"), "http-signature": (400, "replayed_proof")}
    for variant, (status, code) in expected.items():
        headers = signed_headers(web, "GET", f"{ORIGIN}/pay", variant=variant)
        assert a.get("/pay", headers=headers).status_code == 200
        assert_problem(b.get("/pay", headers=headers), status, code)
    assert calls.n == 2
    redis_server.stop()
    got = b.get("/pay", headers=signed_headers(web, "GET", f"{ORIGIN}/pay"))
    assert_problem(got, 503, "replay_cache_unavailable")
    assert calls.n == 2


def test_non_ascii_digit_content_length_is_malformed_not_a_crash() -> None:
    """str.isdigit() accepts "²" (latin-1 0xB2), which int() refuses."""
    import io

    from custos.integrations.asgi import declared_length
    from custos.integrations.wsgi import WimseWSGIMiddleware

    assert declared_length([("content-length", "²")]) is None
    assert declared_length([("content-length", "12")]) == 12

    def app(environ, start_response):  # type: ignore[no-untyped-def]
        raise AssertionError("the app must not be called")

    class NeverVerifier:
        def verify(self, request):  # type: ignore[no-untyped-def]
            raise AssertionError("must be refused before verification")

    statuses: list[str] = []
    mw = WimseWSGIMiddleware(app, NeverVerifier())  # type: ignore[arg-type]
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/pay",
        "CONTENT_LENGTH": "²",
        "wsgi.input": io.BytesIO(b"xx"),
    }
    body = b"".join(mw(environ, lambda status, headers: statuses.append(status)))
    assert statuses[0].startswith("400") and b"malformed_request" in body
