"""The relying party's one verification path keeps every check: strict JSON,
a private header per token, the WIT cache keyed by the token itself, the
remembered path verdicts, the public no-copy header lookup and the Caller
built from the WPT result, each against the input it must still refuse; and
the structure itself (no second path, no private internals of other libraries)."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from custos.bundle import BundleSet, JwtAuthority, TrustBundle
from custos.identity import TrustDomain, WimseId
from custos.integrations.asgi import WimseASGIMiddleware
from custos.keys.jose import joserfc_key
from custos.keys.software import MemoryKeyStore
from custos.wimse.errors import MalformedRequestError, WitError, WptError
from custos.wimse.http.message import HttpMessage
from custos.wimse.replay import MemoryReplayCache
from custos.wimse.verifier import Caller, RequestVerifier
from custos.wimse.wit import (
    WitVerifier,
    _fail,
    decode_compact,
    json_object_strict,
    mint_wit,
)
from custos.wimse.wpt import VerifiedCaller, WptVerifier, create_wpt, wpt_headers

NOW = 1745509000
EXAMPLE = TrustDomain("example.com")
ORIGIN = "https://api.example.com"
SUB = WimseId.parse("wimse://example.com/svc/a")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# -- strict JSON ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '{"a":1}',
        ' {"a":1}',  # leading whitespace: the fallback decides
        '{"a":1} ',  # trailing whitespace: the fallback decides
        '{"a":{"b":[1,2]}}',
        "{}",
    ],
)
def test_json_strict_accepts_what_json_accepts(text: str) -> None:
    assert json_object_strict(text.encode()) == json.loads(text)


@pytest.mark.parametrize(
    "text",
    [
        '{"a":1,"a":2}',  # duplicate member
        '{"a":{"b":1,"b":2}}',  # nested duplicate
        ' {"a":1,"a":2}',  # duplicate behind leading whitespace
        '{"a":NaN}',
        '{"a":Infinity}',
        '{"a":1}x',  # trailing data after a complete object
        '{"a":1}{"b":2}',
        '{"a":1',  # truncated
        "[1]",
        '"s"',
        "",
        "{",
    ],
)
def test_attack_json_strict_refusals(text: str) -> None:
    with pytest.raises(ValueError):
        json_object_strict(text.encode())


# -- the decoded JOSE header ----------------------------------------------------


def _token(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}.{b64(b'sig')}"


def _decode(token: str) -> Any:
    return decode_compact(token, max_bytes=8192, error=_fail, prefix="wit")


def test_remembered_header_is_a_private_copy_per_token() -> None:
    token = _token({"alg": "ES256", "typ": "wit+jwt", "kid": "k-copy"}, {"n": 1})
    first = _decode(token)
    first.header["alg"] = "none"
    first.header["injected"] = "x"
    again = _decode(token)
    assert again.header == {"alg": "ES256", "typ": "wit+jwt", "kid": "k-copy"}


def test_nested_header_is_decoded_fresh_each_time() -> None:
    token = _token({"alg": "ES256", "jwk": {"kty": "EC"}}, {"n": 1})
    first = _decode(token)
    first.header["jwk"]["kty"] = "oct"
    assert _decode(token).header["jwk"] == {"kty": "EC"}


def test_attack_bad_header_is_refused_every_time() -> None:
    bad = b64(b'{"alg":"ES256","alg":"none"}') + "." + b64(b"{}") + "." + b64(b"s")
    for _ in range(2):  # the refusal is not remembered as a success
        with pytest.raises(WitError) as info:
            _decode(bad)
        assert info.value.code == "wit_malformed"
    crit = _token({"alg": "ES256", "crit": "exp"}, {})
    for _ in range(2):
        with pytest.raises(WitError):
            _decode(crit)


# -- HttpMessage.header_values -------------------------------------------------------


def test_header_values_any_case_immutable_and_get_all_copies() -> None:
    message = HttpMessage.request("GET", "/", [("X-A", "1"), ("x-a", "2"), ("B", "3")])
    assert message.header_values("x-a") == ("1", "2")
    assert message.header_values("X-A") == ("1", "2")
    assert message.header_values("nope") == ()
    assert message.has_header("b") and not message.has_header("c")
    with pytest.raises(AttributeError):
        message.header_values("x-a").append("evil")  # type: ignore[attr-defined]
    copy = message.get_all("X-A")
    copy.append("evil")
    assert message.get_all("x-a") == ["1", "2"]
    # The index is derived: equality, hash and repr are the fields' alone.
    twin = HttpMessage.request("GET", "/", [("X-A", "1"), ("x-a", "2"), ("B", "3")])
    assert twin == message and hash(twin) == hash(message)
    assert "_index" not in repr(message)


def test_message_built_by_hand_indexes_like_request() -> None:
    direct = HttpMessage((("Workload-Identity-Token", "w"),), None, "GET", "/", None)
    assert direct.header_values("workload-identity-token") == ("w",)
    with pytest.raises(AttributeError):
        direct.headers = ()  # type: ignore[misc]


# -- WIT cache keyed by the token, path cache, caller fast path ---------------------


@pytest.fixture(scope="module")
def store() -> MemoryKeyStore:
    s = MemoryKeyStore()
    s.create("issuer", "ES256")
    s.create("w", "ES256")
    return s


@pytest.fixture(scope="module")
def bundles(store: MemoryKeyStore) -> BundleSet:
    jwk = store.public_jwk("issuer")
    authority = JwtAuthority(jwk["kid"], store.public_key("issuer"), None, "ES256")
    return BundleSet([TrustBundle(EXAMPLE, (), (authority,))])


def mint(store: MemoryKeyStore) -> str:
    return mint_wit(
        joserfc_key(store.get("issuer")),
        "ES256",
        store.public_jwk("issuer")["kid"],
        SUB,
        store.public_jwk("w"),
        timedelta(hours=1),
        now=NOW,
    )


def wpt_request(store: MemoryKeyStore, wit: str, target: str = "/pay") -> HttpMessage:
    path = target.split("?", 1)[0]
    proof = create_wpt(joserfc_key(store.get("w")), wit, ORIGIN + path, now=NOW)
    return HttpMessage.request("POST", target, wpt_headers(wit, proof))


def test_wit_cache_serves_the_exact_token_only(store: MemoryKeyStore, bundles: BundleSet) -> None:
    wit = mint(store)
    wits = WitVerifier(bundles, now=NOW)
    first = wits.verify(wit)
    assert wits.verify(wit) is first and len(wits) == 1
    # The same bytes spelled differently (non-canonical last base64url char of
    # the signature) would hash differently and compare differently: refused.
    head, body, sig = wit.split(".")
    twin = f"{head}.{body}.{sig[:-1]}{chr(ord(sig[-1]) ^ 1)}"
    with pytest.raises(WitError):
        wits.verify(twin)
    assert len(wits) == 1


def test_wit_cache_off_stores_nothing(store: MemoryKeyStore, bundles: BundleSet) -> None:
    wits = WitVerifier(bundles, now=NOW, max_entries=0)
    wit = mint(store)
    assert wits.verify(wit).token_hash == wits.verify(wit).token_hash
    assert len(wits) == 0


@pytest.mark.parametrize("target", ["/a/%2e%2e/pay", "/pay//x", "/a/..;/pay", "/p\\ay"])
def test_attack_unsafe_paths_refused_every_time(
    store: MemoryKeyStore, bundles: BundleSet, target: str
) -> None:
    v = WptVerifier(bundles, audiences=[ORIGIN], replay=MemoryReplayCache(), now=NOW)
    wit = mint(store)
    for _ in range(2):  # a refusal is never remembered as a verdict
        with pytest.raises(MalformedRequestError) as info:
            v.verify(wpt_request(store, wit, target))
        assert info.value.code == "unsafe_request_target"


def test_path_verdict_ignores_query_but_audience_still_checked(
    store: MemoryKeyStore, bundles: BundleSet
) -> None:
    v = WptVerifier(bundles, audiences=[ORIGIN], replay=MemoryReplayCache(), now=NOW)
    wit = mint(store)
    v.verify(wpt_request(store, wit, "/pay?x=1"))
    v.verify(wpt_request(store, wit, "/pay?y=2"))
    proof = create_wpt(joserfc_key(store.get("w")), wit, ORIGIN + "/pay", now=NOW)
    other = HttpMessage.request("POST", "/payroll", wpt_headers(wit, proof))
    with pytest.raises(WptError) as info:
        v.verify(other)
    assert info.value.code == "wpt_bad_audience"


def test_request_verifier_caller_comes_from_the_wpt_result(
    store: MemoryKeyStore, bundles: BundleSet
) -> None:
    v = WptVerifier(bundles, audiences=[ORIGIN], replay=MemoryReplayCache(), now=NOW)
    wit = mint(store)
    result = v.verify(wpt_request(store, wit))
    assert type(result) is VerifiedCaller
    assert result.nonce is None and result.sign_response is False
    caller = RequestVerifier(wpt=v).verify(wpt_request(store, wit))
    assert caller == Caller(str(SUB), "example.com", "wpt", result.wit_claims)
    assert caller.nonce is None and not caller.wants_signed_response


class _SubclassedWpt(WptVerifier):
    """A subclass gets the same treatment as the class: there is no type switch."""


def test_subclassed_wpt_verifier_takes_the_same_path(
    store: MemoryKeyStore, bundles: BundleSet
) -> None:
    v = _SubclassedWpt(bundles, audiences=[ORIGIN], replay=MemoryReplayCache(), now=NOW)
    wit = mint(store)
    request = wpt_request(store, wit)
    assert RequestVerifier(wpt=v).verify(request).subject == str(SUB)
    with pytest.raises(WptError) as info:  # and the same replay check
        RequestVerifier(wpt=v).verify(request)
    assert info.value.code == "wpt_replayed"


# -- structure: one path, public APIs only -----------------------------------------

_SRC = Path(__file__).resolve().parents[2] / "src" / "custos" / "wimse"
_OWN = ["wit.py", "wpt.py", "verifier.py", "signer.py", "http/message.py"]


@pytest.mark.parametrize("name", _OWN)
def test_no_private_internals_and_no_hand_built_frozen_values(name: str) -> None:
    text = (_SRC / name).read_text()
    for pattern in (
        r"object\.__new__",
        r"hazmat\.bindings",
        r"scan_once",
        r"\.__dict__\[",
        r"\.__dict__\.update",
        r"_index\b(?!_)",
        r"type\([^)]*\) is (?!str\b)",
        r"_NotTheFastPath|_verify_request",
    ):
        if name == "http/message.py" and pattern.startswith("_index"):
            continue  # the message's own index
        assert not re.search(pattern, text), f"{name}: {pattern}"


@pytest.mark.parametrize("name", _OWN)
def test_token_modules_log_nothing(name: str) -> None:
    # wpt-02: raw WPTs must not be logged. These modules hold WITs, WPTs and
    # signatures, so they do not log at all (what happened is said by the
    # error code, which the integrations log); the end-to-end capture of every
    # log record through the middlewares is in the integration tests.
    text = (_SRC / name).read_text()
    assert not re.search(r"^\s*(import|from)\s+(logging|structlog)\b", text, re.M)
    assert "getLogger" not in text and "print(" not in text


# -- the middleware: headers decoded once, still every check -------------------------


def _run(mw: WimseASGIMiddleware, scope: dict[str, Any], body: bytes = b"") -> int:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(mw(scope, receive, send))
    return int(sent[0]["status"])


def test_middleware_verifies_and_limits_with_one_header_decode(
    store: MemoryKeyStore, bundles: BundleSet
) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert scope["custos.caller"].subject == str(SUB)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    # the replay cache runs on the same pinned clock as the verifier
    replay = MemoryReplayCache(clock=lambda: NOW)
    verifier = RequestVerifier(wpt=WptVerifier(bundles, audiences=[ORIGIN], replay=replay, now=NOW))
    mw = WimseASGIMiddleware(app, verifier, max_body=10, verify_in_thread=False)
    wit = mint(store)

    def scope(extra: list[tuple[bytes, bytes]] = []) -> dict[str, Any]:  # noqa: B006
        request = wpt_request(store, wit)
        return {
            "type": "http",
            "method": "POST",
            "path": "/pay",
            "raw_path": b"/pay",
            "query_string": b"",
            # mixed-case names as a server might pass them
            "headers": [(k.encode(), v.encode()) for k, v in request.headers] + extra,
        }

    assert _run(mw, scope()) == 204
    assert _run(mw, scope([(b"Content-Length", b"11")])) == 413
    replayed = scope()
    assert _run(mw, dict(replayed)) == 204
    assert _run(mw, dict(replayed)) == 401


# -- the plain wpt-02 Authorization fast path ----------------------------------------


@pytest.mark.parametrize(
    ("spell", "code"),
    [
        ("WPT {}", None),
        ("wpt {}", None),
        ("wPt   {}", None),
        (" \tWPT {} \t", None),
        ("WPT\t{}", "wpt_missing"),  # not "WPT" + spaces: no WPT scheme at all
        ("WPTX {}", "wpt_missing"),
        ("WPT", "wpt_malformed"),  # scheme "wpt", no credentials
        ("WPT ", "wpt_malformed"),
        ("WPT {} x", "wpt_malformed"),  # not one token68
        ("WPT {}+", "wpt_malformed"),  # token68, but not base64url
        ("WPT a{}", "wpt_malformed"),  # token68, but its header part is not base64url
        ("WPT {}.", "wpt_malformed"),  # four parts
        ("WPT \u212a{}", "wpt_malformed"),  # non-ASCII credentials
        ("\u212aPT {}", "wpt_missing"),
    ],
)
def test_attack_wpt02_authorization_spellings(
    store: MemoryKeyStore, bundles: BundleSet, spell: str, code: str | None
) -> None:
    v = WptVerifier(bundles, audiences=[ORIGIN], replay=MemoryReplayCache(), now=NOW)
    wit = mint(store)
    proof = create_wpt(joserfc_key(store.get("w")), wit, ORIGIN + "/pay", now=NOW)
    request = HttpMessage.request(
        "POST",
        "/pay",
        [("Workload-Identity-Token", wit), ("Authorization", spell.format(proof))],
    )
    if code is None:
        assert v.verify(request).wire == "wpt-02"
        return
    with pytest.raises(WptError) as info:
        v.verify(request)
    assert info.value.code == code


def test_attack_too_large_non_token68_proof_is_malformed_first(
    store: MemoryKeyStore, bundles: BundleSet
) -> None:
    # The token68 test comes before the size test, as it did before the fast path.
    v = WptVerifier(bundles, audiences=[ORIGIN], replay=MemoryReplayCache(), now=NOW)
    wit = mint(store)
    request = HttpMessage.request(
        "POST",
        "/pay",
        [("Workload-Identity-Token", wit), ("Authorization", "WPT " + "a b" * 5000)],
    )
    with pytest.raises(WptError) as info:
        v.verify(request)
    assert info.value.code == "wpt_malformed"
    big = HttpMessage.request(
        "POST", "/pay", [("Workload-Identity-Token", wit), ("Authorization", "WPT " + "a" * 9000)]
    )
    with pytest.raises(WptError) as info:
        v.verify(big)
    assert info.value.code == "wpt_too_large"


def test_endpoint_origin_follows_the_origin_rules() -> None:
    from custos.wimse.http.message import Endpoint
    from custos.wimse.http.origin import InvalidOriginError

    assert Endpoint("HTTPS", "API.Example.COM", 443).origin() == "https://api.example.com"
    assert Endpoint("http", "::1", 8080).origin() == "http://[::1]:8080"
    assert Endpoint("https", "bücher.example").origin() == "https://xn--bcher-kva.example"
    with pytest.raises(InvalidOriginError):
        Endpoint("ftp", "h").origin()
