"""Client-side WIMSE auth end to end: httpx (sync and async) and requests
clients sign real requests that real servers verify.

- httpx.Client + WimseAuth -> Starlette app behind WimseASGIMiddleware
  (Starlette's TestClient: an httpx.Client over an in-process ASGI transport);
- httpx.AsyncClient + WimseAuth -> the same app over httpx.ASGITransport;
- requests + WimseRequestsAuth -> a Flask app behind WimseWSGIMiddleware, served
  by a real werkzeug server on 127.0.0.1 (real HTTP);

each in both variants (WPT and HTTP signature). Keys live in a MemoryKeyStore;
the WIT is minted by custos.wimse.wit under a CA key whose public JWK is in
the relying party's BundleSet. Plus what the client side itself guarantees:
query-free audiences, a fresh proof per request, no clobbered Authorization.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests
from flask import Flask
from flask import request as flask_request
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from werkzeug.serving import make_server
from wimse_rig import ca_bundles, mint_example_wit

from custos.bundle import BundleSet
from custos.identity import SpiffeId
from custos.integrations.asgi import WimseASGIMiddleware
from custos.integrations.auth import ClientAuthError, WimseAuth, WimseRequestsAuth, audience_for
from custos.integrations.wsgi import WimseWSGIMiddleware, caller_of
from custos.keys.software import MemoryKeyStore
from custos.wimse.digest import content_digest
from custos.wimse.errors import MalformedRequestError
from custos.wimse.http.message import HttpMessage
from custos.wimse.httpsig import parse_signature_input
from custos.wimse.signer import LocalProofSigner, ProofSigner, WorkloadProof
from custos.wimse.verifier import RequestVerifier, build_request_verifier
from custos.wimse.wit import b64url_decode_strict, json_object_strict, token_hash

WEB = SpiffeId.parse("spiffe://example.org/ns/shop/sa/web")
ORIGIN = "https://api.example.org"
VARIANTS = ["wpt", "http-signature"]


def claims_of(jwt: str) -> dict[str, Any]:
    return json_object_strict(b64url_decode_strict(jwt.split(".")[1]))


# -- the rig: keys, bundle, WIT, signer --


@pytest.fixture
def store() -> MemoryKeyStore:
    s = MemoryKeyStore()
    s.create("ca", "ES256")
    s.create("web", "ES256")
    return s


@pytest.fixture
def bundles(store: MemoryKeyStore) -> BundleSet:
    return ca_bundles(store)


def mint(store: MemoryKeyStore, subject: SpiffeId = WEB, key: str = "web") -> str:
    return mint_example_wit(store, subject, key)


@pytest.fixture
def signer(store: MemoryKeyStore) -> LocalProofSigner:
    return LocalProofSigner(store.get("web"), mint(store))


# -- the servers --


async def whoami(request: Request) -> JSONResponse:
    caller = request.state.wimse_caller
    body = await request.body()
    return JSONResponse({"sub": caller.subject, "variant": caller.variant, "body": body.decode()})


def starlette_app(bundles: BundleSet, origin: str = ORIGIN) -> Starlette:
    verifier = build_request_verifier(bundles, [origin])
    return Starlette(
        routes=[Route("/pay", whoami, methods=["GET", "POST"])],
        middleware=[Middleware(WimseASGIMiddleware, verifier=verifier)],
    )


def flask_app(verifier: RequestVerifier) -> Flask:
    app = Flask("wimse-test")

    @app.route("/pay", methods=["GET", "POST"])
    def pay() -> dict[str, str]:
        caller = caller_of(flask_request.environ)
        assert caller is not None
        return {
            "sub": caller.subject,
            "variant": caller.variant,
            "body": flask_request.get_data(as_text=True),
        }

    app.wsgi_app = WimseWSGIMiddleware(app.wsgi_app, verifier)  # type: ignore[method-assign]
    return app


@pytest.fixture
def flask_server(bundles: BundleSet) -> Iterator[str]:
    """A real HTTP server (werkzeug) on a free loopback port; yields its origin."""
    holder: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        return holder["app"](environ, start_response)

    server = make_server("127.0.0.1", 0, app, threaded=True)
    origin = f"http://127.0.0.1:{server.server_port}"
    holder["app"] = flask_app(build_request_verifier(bundles, [origin]))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield origin
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()


# -- httpx, sync --


@pytest.mark.parametrize("variant", VARIANTS)
def test_httpx_sync_to_starlette(
    variant: Any, signer: LocalProofSigner, bundles: BundleSet
) -> None:
    with TestClient(starlette_app(bundles), base_url=ORIGIN) as client:
        client.auth = WimseAuth(signer, variant=variant)
        got = client.post("/pay?amount=5", content=b'{"amount": 5}')
        assert got.status_code == 200, got.text
        assert got.json() == {"sub": str(WEB), "variant": variant, "body": '{"amount": 5}'}
        # A second request gets a fresh proof: nothing is replayed.
        assert client.get("/pay").status_code == 200


def test_httpx_without_auth_is_refused(bundles: BundleSet) -> None:
    with TestClient(starlette_app(bundles), base_url=ORIGIN) as client:
        got = client.get("/pay")
    assert got.status_code == 400
    assert got.json()["code"] == "wit_missing"


def test_proof_for_another_origin_is_refused(signer: LocalProofSigner, bundles: BundleSet) -> None:
    # The relying party serves https://api.example.org; a proof made for the
    # same path on another origin must not be accepted there.
    with TestClient(
        starlette_app(bundles, origin="https://other.example.org"), base_url=ORIGIN
    ) as c:
        c.auth = WimseAuth(signer)
        got = c.get("/pay")
    assert got.status_code == 401
    assert got.headers["www-authenticate"] == "WPT"
    assert got.json()["code"] == "wpt_bad_audience"


# -- httpx, async --


@pytest.mark.parametrize("variant", VARIANTS)
def test_httpx_async_to_starlette(
    variant: Any, signer: LocalProofSigner, bundles: BundleSet
) -> None:
    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=starlette_app(bundles))
        auth = WimseAuth(signer, variant=variant)
        async with httpx.AsyncClient(transport=transport, base_url=ORIGIN, auth=auth) as client:
            return [await client.post("/pay", json={"n": i}) for i in range(2)]

    first, second = asyncio.run(run())
    assert first.status_code == 200, first.text
    assert first.json() == {"sub": str(WEB), "variant": variant, "body": '{"n":0}'}
    assert second.status_code == 200


# -- requests -> Flask over real HTTP --


@pytest.mark.parametrize("variant", VARIANTS)
def test_requests_to_flask_over_http(
    variant: Any, signer: LocalProofSigner, flask_server: str
) -> None:
    auth = WimseRequestsAuth(signer, variant=variant)
    with requests.Session() as session:
        got = session.post(f"{flask_server}/pay?x=1", json={"amount": 5}, auth=auth, timeout=10)
        assert got.status_code == 200, got.text
        assert got.json() == {"sub": str(WEB), "variant": variant, "body": '{"amount": 5}'}
        # str bodies are signed as the UTF-8 bytes that are actually sent.
        got = session.post(f"{flask_server}/pay", data="crème brûlée", auth=auth, timeout=10)
        assert got.status_code == 200, got.text
        assert got.json()["body"] == "crème brûlée"
        got = session.get(f"{flask_server}/pay", timeout=10)
        assert got.status_code == 400
        assert got.headers["content-type"] == "application/problem+json"


def test_requests_replayed_over_http_is_refused(
    signer: LocalProofSigner, flask_server: str
) -> None:
    prepared = requests.Request("GET", f"{flask_server}/pay").prepare()
    WimseRequestsAuth(signer)(prepared)
    with requests.Session() as session:
        assert session.send(prepared, timeout=10).status_code == 200
        again = session.send(prepared, timeout=10)
    assert again.status_code == 401
    assert again.headers["www-authenticate"] == "WPT"
    assert again.json()["code"] == "wpt_replayed"


def test_requests_streaming_body_is_refused(signer: LocalProofSigner) -> None:
    prepared = requests.Request(
        "POST", "https://api.example.org/pay", data=iter([b"a", b"b"])
    ).prepare()
    with pytest.raises(ClientAuthError) as err:
        WimseRequestsAuth(signer, variant="http-signature")(prepared)
    assert err.value.code == "body_not_bytes"


# -- what goes on the wire --


class Capture:
    """An httpx MockTransport that records what the client sent."""

    def __init__(self) -> None:
        self.sent: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request)
        return httpx.Response(204)


def test_wpt_wire_form(signer: LocalProofSigner) -> None:
    cap = Capture()
    with httpx.Client(transport=httpx.MockTransport(cap), auth=WimseAuth(signer)) as client:
        client.get("https://API.example.org:443/pay/x?secret=1#frag")
        client.get("https://api.example.org:8443/pay/x")
    first, second = cap.sent
    scheme, _, wpt = first.headers["authorization"].partition(" ")
    assert scheme == "WPT"
    claims = claims_of(wpt)
    # query and fragment dropped, default port dropped, host lowercase
    assert claims["aud"] == "https://api.example.org/pay/x"
    assert claims["wth"] == token_hash(first.headers["workload-identity-token"])
    assert claims_of(second.headers["authorization"][4:])["aud"] == (
        "https://api.example.org:8443/pay/x"
    )
    # one proof per request
    assert claims_of(second.headers["authorization"][4:])["jti"] != claims["jti"]


def test_http_signature_wire_form(signer: LocalProofSigner) -> None:
    cap = Capture()
    auth = WimseAuth(signer, variant="http-signature", txn_token="txn.a.b")
    with httpx.Client(transport=httpx.MockTransport(cap), auth=auth) as client:
        client.post(
            "https://api.example.org/pay?x=1",
            content=b"hello",
            headers={"Authorization": "Bearer at-1", "Content-Type": "text/plain"},
        )
    (sent,) = cap.sent
    assert sent.headers["authorization"] == "Bearer at-1"  # left alone in this variant
    assert sent.headers["content-digest"] == content_digest(b"hello")
    assert sent.headers["txn-token"] == "txn.a.b"
    (sig,) = parse_signature_input(sent.headers["signature-input"]).values()
    assert sig.params["wimse-aud"] == "https://api.example.org/pay"
    covered = {c.name for c in sig.components}
    assert {"authorization", "content-digest", "txn-token", "workload-identity-token"} <= covered


def test_wpt_with_txn_token_verifies(
    store: MemoryKeyStore, signer: LocalProofSigner, bundles: BundleSet
) -> None:
    with TestClient(starlette_app(bundles), base_url=ORIGIN) as client:
        client.auth = WimseAuth(signer, txn_token="eyJ0eXAiOiJ0eG4ifQ.e30.sig")
        assert client.get("/pay").status_code == 200
        # The same proof with the Txn-Token swapped in transit: refused.
        cap = Capture()
        with httpx.Client(transport=httpx.MockTransport(cap), auth=client.auth) as c2:
            c2.get(f"{ORIGIN}/pay")
        headers = dict(cap.sent[0].headers)
        headers["txn-token"] = "eyJ0eXAiOiJ0eG4ifQ.e30.other"
        got = client.get("/pay", headers=headers, auth=None)
    assert got.status_code == 401
    assert got.json()["code"] == "wpt_tth_mismatch"


@pytest.mark.parametrize("client_kind", ["httpx", "requests"])
def test_wpt_refuses_an_existing_authorization(client_kind: str, signer: LocalProofSigner) -> None:
    if client_kind == "httpx":
        cap = Capture()
        with (
            httpx.Client(transport=httpx.MockTransport(cap), auth=WimseAuth(signer)) as client,
            pytest.raises(ClientAuthError) as err,
        ):
            client.get("https://api.example.org/pay", headers={"Authorization": "Bearer t"})
        assert cap.sent == []  # nothing left the client
    else:
        prepared = requests.Request(
            "GET", "https://api.example.org/pay", headers={"Authorization": "Bearer t"}
        ).prepare()
        with pytest.raises(ClientAuthError) as err:
            WimseRequestsAuth(signer)(prepared)
        assert prepared.headers["Authorization"] == "Bearer t"
    assert err.value.code == "authorization_taken"
    assert "Authorization" in err.value.message


def test_rotating_wit_keeps_wpt_and_wit_together(store: MemoryKeyStore) -> None:
    """The WIT sent is the one the WPT's wth names, even when the getter
    returns a new WIT on every call (rotation in progress)."""
    calls = 0

    def current_wit() -> str:
        nonlocal calls
        calls += 1
        return mint(store)

    rotating = LocalProofSigner(store.get("web"), current_wit)
    cap = Capture()
    with httpx.Client(transport=httpx.MockTransport(cap), auth=WimseAuth(rotating)) as client:
        client.get("https://api.example.org/pay")
    (sent,) = cap.sent
    assert calls == 1
    assert claims_of(sent.headers["authorization"][4:])["wth"] == token_hash(
        sent.headers["workload-identity-token"]
    )


def test_pluggable_signer(signer: LocalProofSigner, bundles: BundleSet) -> None:
    """WimseAuth only needs the ProofSigner protocol (the agent client will be one)."""

    class Delegating:
        def __init__(self) -> None:
            self.calls: list[str] = []

        def wpt(self, audience: str, **kw: Any) -> WorkloadProof:
            self.calls.append(audience)
            return signer.wpt(audience, **kw)

        def sign_http(self, request: HttpMessage, audience: str) -> HttpMessage:
            self.calls.append(audience)
            return signer.sign_http(request, audience)

    other = Delegating()
    assert isinstance(other, ProofSigner)
    with TestClient(starlette_app(bundles), base_url=ORIGIN) as client:
        client.auth = WimseAuth(other)
        assert client.get("/pay?q=1").status_code == 200
    assert other.calls == [f"{ORIGIN}/pay"]
    assert "<redacted>" in repr(signer.wpt(f"{ORIGIN}/pay"))


def test_audience_for() -> None:
    assert audience_for("HTTPS", "API.example.org", 443, "/a?b") == "https://api.example.org/a"
    assert audience_for("http", "::1", 8080, "") == "http://[::1]:8080/"
    assert audience_for("http", "h", 80, "/x%20y") == "http://h/x%20y"
    # the origin rules: a target every verifier refuses is not signed at all
    for unsafe in ("/x%2Fy", "/a/../b", "/a/%2e%2e/b", "/a//b"):
        with pytest.raises(MalformedRequestError):
            audience_for("http", "h", 80, unsafe)


def test_unknown_variant_is_refused(signer: LocalProofSigner) -> None:
    with pytest.raises(ClientAuthError):
        WimseAuth(signer, variant="bearer")  # type: ignore[arg-type]


def test_problem_body_is_json(bundles: BundleSet) -> None:
    with TestClient(starlette_app(bundles), base_url=ORIGIN) as client:
        got = client.get("/pay")
    assert json.loads(got.content) == {
        "type": "urn:custos:problem:wit_missing",
        "title": "Bad Request",
        "status": 400,
        "code": "wit_missing",
    }


# -- audit of issue 7: userinfo in the URL is refused, not silently dropped -------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "url", ["https://user:pw@api.example.org/pay", "https://user@api.example.org/pay"]
)
def test_url_with_userinfo_is_refused_by_both_clients(
    signer: LocalProofSigner, variant: str, url: str
) -> None:
    # The proof would name https://api.example.org/pay while the request goes out
    # with credentials in its URL (RFC 9110 §4.2.4: userinfo must not be sent).
    cap = Capture()
    auth = WimseAuth(signer, variant=variant)  # type: ignore[arg-type]
    with (
        httpx.Client(transport=httpx.MockTransport(cap), auth=auth) as client,
        pytest.raises(ClientAuthError) as from_httpx,
    ):
        client.get(url)
    assert cap.sent == []  # nothing left the client
    prepared = requests.Request("GET", url).prepare()
    with pytest.raises(ClientAuthError) as from_requests:
        WimseRequestsAuth(signer, variant=variant)(prepared)  # type: ignore[arg-type]
    for err in (from_httpx.value, from_requests.value):
        assert err.code == "url_has_userinfo"
        assert "userinfo" in err.message and "pw" not in err.message
    assert "Workload-Identity-Token" not in prepared.headers
