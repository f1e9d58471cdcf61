"""One table of origin and request-target rules, run against every user of them.

Each row states its expected result.  The same rows run against:

- the rules themselves (:mod:`custos.wimse.http.origin`);
- the signer: ``audience_for`` of the client auth, and the httpx / requests
  auth classes end to end (the ``aud`` of the WPT they send);
- the WPT verifier, the HTTP-signature verifier and ``build_request_verifier``
  (what the middlewares are configured with);
- both middlewares, ASGI and WSGI, driven with raw requests, with a WPT and
  with an HTTP signature.

A proof names ``origin + path`` and is compared as an exact string, so an
origin row passes when every configuration spelling of it is normalised to the
one expected string (and a refused spelling is refused at configuration), and
a path row passes when every user accepts or refuses the same target.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import pytest
import requests
from wimse_rig import ca_bundles, mint_example_wit

from custos.errors import CustosError
from custos.identity import SpiffeId
from custos.integrations.asgi import WimseASGIMiddleware
from custos.integrations.auth import WimseAuth, WimseRequestsAuth, audience_for
from custos.integrations.problem import http_status
from custos.integrations.wsgi import WimseWSGIMiddleware
from custos.keys import MemoryKeyStore
from custos.wimse.errors import WimseError
from custos.wimse.http.message import HttpMessage
from custos.wimse.http.origin import (
    InvalidOriginError,
    UnsafeTargetError,
    normalize_origin,
    request_path,
    target_uri,
)
from custos.wimse.httpsig import HttpSignatureVerifier, sign_request
from custos.wimse.replay import MemoryReplayCache
from custos.wimse.signer import LocalProofSigner
from custos.wimse.verifier import build_request_verifier
from custos.wimse.wit import WitVerifier
from custos.wimse.wpt import WptVerifier, wpt_headers

CALLER = SpiffeId.parse("spiffe://example.org/ns/shop/sa/web")
REFUSED = None


@dataclass(frozen=True)
class OriginRow:
    id: str
    #: an origin as written in configuration or in a client's URL
    given: str
    #: the one normalised spelling, or REFUSED
    expected: str | None


ORIGIN_ROWS = [
    OriginRow("plain", "https://api.example.org", "https://api.example.org"),
    OriginRow("upper-case host", "https://API.Example.ORG", "https://api.example.org"),
    OriginRow("upper-case scheme", "HTTPS://api.example.org", "https://api.example.org"),
    OriginRow("default https port", "https://api.example.org:443", "https://api.example.org"),
    OriginRow("default http port", "http://api.example.org:80", "http://api.example.org"),
    OriginRow("other port", "https://api.example.org:8443", "https://api.example.org:8443"),
    OriginRow("http port on https", "https://api.example.org:80", "https://api.example.org:80"),
    OriginRow("port with leading zero", "https://api.example.org:0443", "https://api.example.org"),
    OriginRow("IPv6 literal", "https://[::1]:8443", "https://[::1]:8443"),
    OriginRow("IPv6 long form", "https://[0:0:0:0:0:0:0:1]", "https://[::1]"),
    OriginRow("IPv6 upper case", "https://[2001:DB8::1]", "https://[2001:db8::1]"),
    OriginRow("IPv6 zone id", "https://[fe80::1%25eth0]", REFUSED),
    OriginRow("IPv4 literal", "http://127.0.0.1:8080", "http://127.0.0.1:8080"),
    OriginRow("IPv4 shorthand", "http://127.1", REFUSED),
    OriginRow("IPv4 hex", "http://0x7f.0.0.1", REFUSED),
    OriginRow("IDNA U-label", "https://bücher.example", "https://xn--bcher-kva.example"),
    OriginRow("IDNA upper case", "https://BÜCHER.example", "https://xn--bcher-kva.example"),
    OriginRow("IDNA A-label", "https://xn--bcher-kva.example", "https://xn--bcher-kva.example"),
    OriginRow("invalid A-label", "https://xn--zz.example", REFUSED),
    OriginRow("trailing dot", "https://api.example.org.", REFUSED),
    OriginRow("empty label", "https://api..example.org", REFUSED),
    OriginRow("userinfo", "https://user@api.example.org", REFUSED),
    OriginRow("userinfo with password", "https://u:p@api.example.org", REFUSED),
    OriginRow("percent in host", "https://api%2eexample.org", REFUSED),
    OriginRow("not http", "ftp://api.example.org", REFUSED),
    OriginRow("port out of range", "https://api.example.org:65536", REFUSED),
    OriginRow("port zero", "https://api.example.org:0", REFUSED),
]


@dataclass(frozen=True)
class TargetRow:
    id: str
    #: the request target as it goes on the wire (origin form)
    target: str
    #: the path a proof names, or REFUSED
    expected: str | None


TARGET_ROWS = [
    TargetRow("root", "/", "/"),
    TargetRow("plain", "/pay", "/pay"),
    TargetRow("trailing slash", "/pay/", "/pay/"),
    TargetRow("query left out", "/pay?x=1", "/pay"),
    TargetRow("empty query", "/pay?", "/pay"),
    TargetRow("dots inside the query", "/pay?x=../..", "/pay"),
    TargetRow("encoded space", "/a%20b", "/a%20b"),
    TargetRow("encoded unreserved kept as sent", "/p%61y", "/p%61y"),
    TargetRow("lower-case hex kept as sent", "/a%3ab", "/a%3ab"),
    TargetRow("tilde", "/~user/x", "/~user/x"),
    TargetRow("dot-dot", "/pay/../admin", REFUSED),
    TargetRow("dot", "/./pay", REFUSED),
    TargetRow("trailing dot segment", "/pay/.", REFUSED),
    TargetRow("dot-dot with parameter", "/pay/..;/admin", REFUSED),
    TargetRow("encoded dot-dot", "/%2e%2e/admin", REFUSED),
    TargetRow("encoded dot-dot upper", "/%2E%2E/admin", REFUSED),
    TargetRow("encoded slash", "/pay%2fadmin", REFUSED),
    TargetRow("encoded backslash", "/pay%5Cadmin", REFUSED),
    TargetRow("double encoding", "/%252e%252e/admin", REFUSED),
    TargetRow("encoded NUL", "/pay%00", REFUSED),
    TargetRow("lone percent", "/pay%", REFUSED),
    TargetRow("short escape", "/pay%2", REFUSED),
    TargetRow("not hex", "/pay%zz", REFUSED),
    TargetRow("empty segment", "/pay//admin", REFUSED),
    TargetRow("backslash", "/pay\\admin", REFUSED),
    TargetRow("space", "/pay admin", REFUSED),
    TargetRow("fragment", "/pay#frag", REFUSED),
    TargetRow("fragment after query", "/pay?x#frag", REFUSED),
    TargetRow("space in query", "/pay?x=a b", REFUSED),
    TargetRow("non-ASCII path", "/pày", REFUSED),
    TargetRow("non-ASCII query", "/pay?x=é", REFUSED),
    TargetRow("asterisk form", "*", REFUSED),
    TargetRow("absolute form", "https://api.example.org/pay", REFUSED),
]

ORIGIN = "https://api.example.org"


def _ids(rows: list[Any]) -> list[str]:
    return [row.id for row in rows]


# -- rig ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store() -> MemoryKeyStore:
    s = MemoryKeyStore()
    s.create("ca", "ES256")
    s.create("w", "ES256")
    return s


@pytest.fixture(scope="module")
def wit(store: MemoryKeyStore) -> str:
    return mint_example_wit(store, CALLER, "w")


@pytest.fixture(scope="module")
def signer(store: MemoryKeyStore, wit: str) -> LocalProofSigner:
    return LocalProofSigner(store.get("w"), wit)


def _claims(jwt: str) -> dict[str, Any]:
    payload = jwt.split(".")[1]
    decoded: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return decoded


def _refused(fn: Callable[[], object]) -> bool:
    """True when ``fn`` is refused with a custos error (a traceback of any
    other kind fails the test: hostile input must end in a clear error)."""
    try:
        fn()
    except CustosError:
        return True
    return False


def _wpt_request(signer: LocalProofSigner, target: str, aud: str) -> HttpMessage:
    proof = signer.wpt(aud)
    return HttpMessage.request("GET", target, wpt_headers(proof.wit, proof.wpt))


def _sig_request(store: MemoryKeyStore, wit: str, target: str, aud: str) -> HttpMessage:
    """An HTTP-signed request for ``target``.  A target the signer refuses is
    signed as "/pay" and moved onto ``target`` (what a middlebox could do):
    the verifier must refuse it whatever the signature says."""
    try:
        return sign_request(
            HttpMessage.request("GET", target), signer=store.get("w"), wit=wit, audience=aud
        )
    except WimseError:
        # The target, or the audience made from it, cannot be signed.
        signed = sign_request(
            HttpMessage.request("GET", "/pay"),
            signer=store.get("w"),
            wit=wit,
            audience=aud if aud.isascii() else ORIGIN + "/pay",
        )
        return HttpMessage.request("GET", target, signed.headers)


# -- origins ------------------------------------------------------------------------


@pytest.mark.parametrize("row", ORIGIN_ROWS, ids=_ids(ORIGIN_ROWS))
def test_origin_rules(row: OriginRow) -> None:
    if row.expected is REFUSED:
        with pytest.raises(InvalidOriginError) as err:
            normalize_origin(row.given)
        assert isinstance(err.value, ValueError) and err.value.code == "invalid_origin"
    else:
        assert normalize_origin(row.given) == row.expected
        # Idempotent: the normalised form is its own normal form.
        assert normalize_origin(row.expected) == row.expected


@pytest.mark.parametrize("row", ORIGIN_ROWS, ids=_ids(ORIGIN_ROWS))
def test_origin_rules_signer(row: OriginRow) -> None:
    parts = urlsplit(row.given)
    if "@" in parts.netloc:
        # urlsplit drops userinfo from .hostname; pass what a client would see.
        host = parts.netloc.rsplit("@", 1)[0] + "@" + (parts.hostname or "")
    else:
        host = parts.netloc.rsplit(":", 1)[0] if not parts.netloc.endswith("]") else parts.netloc
    try:
        port = parts.port
    except ValueError:
        port = 65536 if row.expected is REFUSED else None
    refused = _refused(lambda: audience_for(parts.scheme, host, port, "/pay"))
    if row.expected is REFUSED:
        assert refused
    else:
        assert audience_for(parts.scheme, host, port, "/pay") == f"{row.expected}/pay"


def _httpx_sent(signer: LocalProofSigner, url: str) -> tuple[str, str]:
    """(the WPT's aud, the normalised target URI the request went to)."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    with httpx.Client(transport=httpx.MockTransport(handler), auth=WimseAuth(signer)) as client:
        client.get(url)
    sent = seen[0].url
    aud = str(_claims(seen[0].headers["authorization"].split(" ", 1)[1])["aud"])
    return aud, target_uri(sent.scheme, sent.raw_host.decode(), sent.port, sent.raw_path.decode())


def _requests_sent(signer: LocalProofSigner, url: str) -> tuple[str, str]:
    prepared = requests.Request("GET", url, auth=WimseRequestsAuth(signer)).prepare()
    aud = str(_claims(str(prepared.headers["Authorization"]).split(" ", 1)[1])["aud"])
    sent = urlsplit(str(prepared.url))
    return aud, target_uri(sent.scheme, sent.hostname or "", sent.port, sent.path)


def _httpx_aud(signer: LocalProofSigner, url: str) -> str:
    return _httpx_sent(signer, url)[0]


def _requests_aud(signer: LocalProofSigner, url: str) -> str:
    return _requests_sent(signer, url)[0]


@pytest.mark.parametrize("client", ["httpx", "requests"])
@pytest.mark.parametrize("row", ORIGIN_ROWS, ids=_ids(ORIGIN_ROWS))
def test_origin_rules_client_auth_end_to_end(
    signer: LocalProofSigner, row: OriginRow, client: str
) -> None:
    url = f"{row.given}/pay"
    if row.expected is not REFUSED:
        send = _httpx_aud if client == "httpx" else _requests_aud
        assert send(signer, url) == f"{row.expected}/pay"
        return
    # Refused by custos or by the HTTP client's own URL parser -- or the
    # client rewrote the URL into a usable one (requests drops ":0" and
    # decodes "%2e"; both drop userinfo from the request line): then the proof
    # names exactly the normalised URI the request goes to, never the spelling
    # that was given.
    try:
        aud, sent_to = (_httpx_sent if client == "httpx" else _requests_sent)(signer, url)
    except (CustosError, httpx.InvalidURL, requests.exceptions.InvalidURL, UnicodeError):
        return
    assert aud == sent_to != url


def _build(store: MemoryKeyStore, user: str, origin: str) -> Any:
    wits = WitVerifier(ca_bundles(store))
    if user == "wpt":
        return WptVerifier(wit_verifier=wits, audiences=[origin], replay=MemoryReplayCache())
    if user == "http-signature":
        return HttpSignatureVerifier(wits, MemoryReplayCache(), [origin])
    return build_request_verifier(ca_bundles(store), [origin])


def _verify(user: str, verifier: Any, request: HttpMessage) -> str:
    if user == "http-signature":
        return str(verifier.verify_request(request).subject)
    return str(verifier.verify(request).subject)


@pytest.mark.parametrize("user", ["wpt", "http-signature", "build_request_verifier"])
@pytest.mark.parametrize("row", ORIGIN_ROWS, ids=_ids(ORIGIN_ROWS))
def test_origin_rules_verifiers(
    store: MemoryKeyStore, wit: str, signer: LocalProofSigner, row: OriginRow, user: str
) -> None:
    if row.expected is REFUSED:
        with pytest.raises(ValueError):
            _build(store, user, row.given)
        return

    def proof(aud: str) -> HttpMessage:
        if user == "http-signature":
            return _sig_request(store, wit, "/pay", aud)
        return _wpt_request(signer, "/pay", aud)

    verifier = _build(store, user, row.given)
    assert _verify(user, verifier, proof(f"{row.expected}/pay")) == str(CALLER)
    if row.given != row.expected:
        # The configured spelling is not a second audience: aud is compared
        # exactly with the normalised form.
        with pytest.raises(WimseError):
            _verify(user, verifier, proof(f"{row.given}/pay"))


# -- request targets ------------------------------------------------------------------


def _path_of(target: str) -> str:
    return target.split("?", 1)[0] if target.startswith("/") else target


@pytest.mark.parametrize("row", TARGET_ROWS, ids=_ids(TARGET_ROWS))
def test_target_rules(row: TargetRow) -> None:
    if row.expected is REFUSED:
        with pytest.raises(UnsafeTargetError) as err:
            request_path(row.target)
        assert err.value.code == "unsafe_request_target" and http_status(err.value) == 400
    else:
        assert request_path(row.target) == row.expected


@pytest.mark.parametrize("row", TARGET_ROWS, ids=_ids(TARGET_ROWS))
def test_target_rules_signer(row: TargetRow) -> None:
    if row.expected is REFUSED:
        assert _refused(lambda: audience_for("https", "api.example.org", None, row.target))
        assert _refused(lambda: target_uri("https", "api.example.org", None, row.target))
    else:
        assert audience_for("https", "api.example.org", None, row.target) == ORIGIN + row.expected


@pytest.mark.parametrize("row", TARGET_ROWS, ids=_ids(TARGET_ROWS))
def test_target_rules_wpt_verifier(
    store: MemoryKeyStore, signer: LocalProofSigner, row: TargetRow
) -> None:
    verifier = _build(store, "wpt", ORIGIN)
    message = _wpt_request(signer, row.target, ORIGIN + _path_of(row.target))
    if row.expected is REFUSED:
        with pytest.raises(WimseError) as err:
            verifier.verify(message)
        assert err.value.code in {"unsafe_request_target", "wpt_bad_audience"}
    else:
        assert verifier.verify(message).subject == CALLER


@pytest.mark.parametrize("row", TARGET_ROWS, ids=_ids(TARGET_ROWS))
def test_target_rules_http_signature_verifier(
    store: MemoryKeyStore, wit: str, row: TargetRow
) -> None:
    verifier = _build(store, "http-signature", ORIGIN)
    request = _sig_request(store, wit, row.target, ORIGIN + _path_of(row.target))
    if row.expected is REFUSED:
        with pytest.raises(WimseError) as err:
            verifier.verify_request(request)
        assert err.value.code == "unsafe_request_target"
    else:
        assert verifier.verify_request(request).audience == ORIGIN + row.expected


# -- both middlewares, raw requests ---------------------------------------------------


async def _ok_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _wsgi_ok(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def _asgi_status(app: WimseASGIMiddleware, request: HttpMessage) -> int:
    from wimse_rig import run_asgi

    assert request.target is not None
    path, _, query = request.target.partition("?")
    raw = path.encode("utf-8", "surrogateescape")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "https",
        "path": unquote(path),
        "raw_path": raw,
        "query_string": query.encode("utf-8"),
        "root_path": "",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in request.headers],
        "server": ("api.example.org", 443),
    }
    sent = run_asgi(app, scope, [{"type": "http.request", "body": b"", "more_body": False}])
    return int(sent[0]["status"])


def _wsgi_status(app: WimseWSGIMiddleware, request: HttpMessage) -> int:
    assert request.target is not None
    path, _, query = request.target.partition("?")
    environ: dict[str, Any] = {
        "REQUEST_METHOD": request.method,
        "SCRIPT_NAME": "",
        # PEP 3333: PATH_INFO is the decoded path, as latin-1 code points.
        "PATH_INFO": unquote(path, encoding="latin-1"),
        "QUERY_STRING": query,
        "RAW_URI": request.target,
        "SERVER_NAME": "api.example.org",
        "SERVER_PORT": "443",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "https",
        "wsgi.input": __import__("io").BytesIO(b""),
    }
    for name, value in request.headers:
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    statuses: list[str] = []
    body = app(environ, lambda status, headers, exc_info=None: statuses.append(status))
    b"".join(body)
    return int(statuses[0].split()[0])


@pytest.mark.parametrize("variant", ["wpt", "http-signature"])
@pytest.mark.parametrize("row", TARGET_ROWS, ids=_ids(TARGET_ROWS))
def test_target_rules_middlewares(
    store: MemoryKeyStore, wit: str, signer: LocalProofSigner, row: TargetRow, variant: str
) -> None:
    aud = ORIGIN + _path_of(row.target)
    if variant == "wpt":
        message = _wpt_request(signer, row.target, aud)
    else:
        message = _sig_request(store, wit, row.target, aud)
    expected = 200 if row.expected is not REFUSED else {400, 401}
    verifier = build_request_verifier(ca_bundles(store), [ORIGIN])
    asgi = WimseASGIMiddleware(_ok_app, verifier, verify_in_thread=False)
    status = _asgi_status(asgi, message)
    assert status == expected if isinstance(expected, int) else status in expected
    # A fresh verifier: the proof is good once.
    verifier = build_request_verifier(ca_bundles(store), [ORIGIN])
    wsgi = WimseWSGIMiddleware(_wsgi_ok, verifier)
    status = _wsgi_status(wsgi, message)
    assert status == expected if isinstance(expected, int) else status in expected


@pytest.mark.parametrize("value", [None, 42, b"https://api.example.org", ["https://a.example"]])
def test_an_origin_that_is_not_a_string_is_a_clear_error(value: object) -> None:
    with pytest.raises(InvalidOriginError):
        normalize_origin(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [None, 42, b"/pay", "\ud800", "/\ud800"])
def test_a_target_that_is_not_a_usable_string_is_a_clear_error(value: object) -> None:
    with pytest.raises(UnsafeTargetError):
        request_path(value)
    with pytest.raises(UnsafeTargetError):
        target_uri("https", "api.example.org", None, value)  # type: ignore[arg-type]


@pytest.mark.parametrize("host", ["\ud800.example", "a" * 300, "", "bad host", "[::1"])
def test_hosts_that_cannot_be_names_are_clear_errors(host: str) -> None:
    with pytest.raises(InvalidOriginError):
        target_uri("https", host, None, "/pay")


def _both_statuses(store: MemoryKeyStore, origin: str, message: HttpMessage) -> tuple[int, int]:
    """(ASGI status, WSGI status) of ``message`` through middlewares whose
    verifiers are configured with ``origin`` (each a fresh verifier: a proof
    is good once)."""
    asgi = WimseASGIMiddleware(
        _ok_app, build_request_verifier(ca_bundles(store), [origin]), verify_in_thread=False
    )
    wsgi = WimseWSGIMiddleware(_wsgi_ok, build_request_verifier(ca_bundles(store), [origin]))
    return _asgi_status(asgi, message), _wsgi_status(wsgi, message)


@pytest.mark.parametrize("variant", ["wpt", "http-signature"])
@pytest.mark.parametrize("row", ORIGIN_ROWS, ids=_ids(ORIGIN_ROWS))
def test_origin_rules_middlewares(
    store: MemoryKeyStore, wit: str, signer: LocalProofSigner, row: OriginRow, variant: str
) -> None:
    """The origin rows through both middlewares. The raw requests carry the
    Host / server of api.example.org whatever the row: a middleware answers
    for its configured origin, never for what the request says it was sent to."""

    def proof(aud: str) -> HttpMessage:
        if variant == "wpt":
            return _wpt_request(signer, "/pay", aud)
        return _sig_request(store, wit, "/pay", aud)

    # problem.py: WPT refusals answer 401, HTTP-signature refusals 400
    refused = (401, 401) if variant == "wpt" else (400, 400)
    if row.expected is REFUSED:
        # Such a middleware cannot be configured at all ...
        with pytest.raises(ValueError):
            build_request_verifier(ca_bundles(store), [row.given])
        # ... and a proof naming the refused spelling (if a signer makes one
        # at all) opens no middleware configured with a good origin.
        try:
            message = proof(f"{row.given}/pay")
        except CustosError:
            return
        assert _both_statuses(store, ORIGIN, message) == refused
        return
    # A proof naming the normalised origin passes a middleware configured
    # with any spelling of it ...
    assert _both_statuses(store, row.given, proof(f"{row.expected}/pay")) == (200, 200)
    if row.given != row.expected:
        # ... and the configured spelling is not a second audience.
        try:
            message = proof(f"{row.given}/pay")
        except CustosError:
            return
        assert _both_statuses(store, row.given, message) == refused
