"""Workload Proof Tokens: the wpt-01 example request, wpt-02 round trips,
every receiver check by name, the attacks they stop, audience/path confusion,
interop with PyJWT / jwcrypto, and no token in errors or logs."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
from datetime import timedelta
from typing import Any

import jwcrypto.jwk
import jwcrypto.jws
import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from joserfc.jwk import ECKey

from custos.bundle import BundleSet, JwtAuthority, TrustBundle
from custos.errors import CustosError
from custos.identity import TrustDomain, WimseId
from custos.integrations.problem import challenge_for, http_status
from custos.keys.jose import joserfc_key
from custos.keys.jwk import public_jwk_members
from custos.keys.software import MemoryKeyStore
from custos.wimse.errors import (
    MalformedRequestError,
    WimseError,
    WitError,
    WptError,
    WptReplayError,
)
from custos.wimse.http.message import Endpoint, HttpMessage
from custos.wimse.replay import MemoryReplayCache
from custos.wimse.wit import WitVerifier, mint_wit, token_hash
from custos.wimse.wpt import (
    WPT_ERROR_CODES,
    WptConfigError,
    WptMintError,
    WptVerifier,
    create_wpt,
    normalize_origin,
    wpt_headers,
)

NOW = 1745509000
EXAMPLE = TrustDomain("example.com")
ORIGIN = "https://api.example.com"

# -- the drafts' vectors (../shared/vectors/wimse-vectors.txt, sections 1 and 2) ----------

DRAFT_WIT = (
    "eyJhbGciOiJFUzI1NiIsImtpZCI6Ikp1bmUgNSIsInR5cCI6IndpdCtqd3QifQ."
    "eyJjbmYiOnsiandrIjp7ImFsZyI6IkVkRFNBIiwiY3J2IjoiRWQyNTUxOSIsImt0eSI6Ik9LUCIsIngiOiIxQ1hY"
    "dmZsTl9MVlZzSXNZWHNVdkIwM0ptbEdXZUNIcVFWdW91Q0Y5MmJnIn19LCJleHAiOjE3NDU1MTI1MTAsImlhdCI6"
    "MTc0NTUwODkxMCwianRpIjoieC1fMUNUTDJjY2EzQ1NFNGN3Yl9sIiwic3ViIjoid2ltc2U6Ly9leGFtcGxlLmNv"
    "bS9zcGVjaWZpYy13b3JrbG9hZCJ9."
    "6KraSQUxWdl9dxFQ3Fj6dPY0Vi88OkwFwZpAIOhLeq6AbXAnLLQgOp8U9UDGcBuYF3KiNv6oKQD1ZWAzrMZOJw"
)
DRAFT_WPT = (
    "eyJhbGciOiJFZERTQSIsInR5cCI6IndwdCtqd3QifQ."
    "eyJhdGgiOiJDTDR3amZwUm1OZi1iZFlJYllMblY5ZDVyTUFSR3dLWUUxMHdVd3pDMGpJIiwiYXVkIjoiaHR0cHM6"
    "Ly93b3JrbG9hZC5leGFtcGxlLmNvbS9wYXRoIiwiZXhwIjoxNzQ1NTEwMDE2LCJqdGkiOiJfX2J3YzRFU0MzYWNj"
    "MkxUQzEtX3giLCJ3dGgiOiJBYVlVZkMzNEQxZGkyRnhRTHBpSUpKN1NnOFZaNm84T0Nkd1NmOUlUb0xnIn0."
    "PI7d9AcYhLoEgPgbJvcM132lkBKnM1NXU-5hZUzVTIyj2dRJaTLFs6e5NYv5gg6AqcV7NvkYCwfgMgWasWQzCA"
)
DRAFT_BEARER = "16_mAd0GiwaZokU26_0902100"
DRAFT_ISSUER_JWK = {
    "kty": "EC",
    "kid": "June 5",
    "crv": "P-256",
    "x": "kXqnA2Op7hgd4zRMbw0iFcc_hDxUxhojxOFVGjE2gks",
    "y": "n__VndPMR021-59UAs0b9qDTFT-EZtT6xSNs_xFskLo",
}
DRAFT_WORKLOAD_D = "sdLX8yCYKqo_XvGBLn-ZWeKT7llYeeQpgeCaXVxb5kY"
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64d(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


class RecordingReplayCache:
    """A tiny ReplayCache (the protocol) that also records what it was asked."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now
        self.seen: dict[tuple[str, str], float] = {}

    def check_and_store(
        self, namespace: str, value: str, expires_at: float, *, now: float | None = None
    ) -> bool:
        known = self.seen.get((namespace, value))
        if known is not None and known > (self.now if now is None else now):
            return False
        self.seen[(namespace, value)] = expires_at
        return True


def draft_request(**changes: Any) -> HttpMessage:
    headers = {
        "Host": "workload.example.com",
        "Content-Type": "application/json",
        "Authorization": f"Bearer {DRAFT_BEARER}",
        "Workload-Identity-Token": DRAFT_WIT,
        "Workload-Proof-Token": DRAFT_WPT,
    }
    target = changes.pop("target", "/path")
    for name, value in changes.items():
        name = name.replace("_", "-")
        if value is None:
            headers.pop(name)
        else:
            headers[name] = value
    return HttpMessage.request("POST", target, list(headers.items()), b'{"do stuff":"please"}')


def draft_verifier(**kw: Any) -> WptVerifier:
    bundles = BundleSet([TrustBundle.from_jwks(EXAMPLE, {"keys": [DRAFT_ISSUER_JWK]})])
    kw.setdefault("replay", RecordingReplayCache())
    kw.setdefault("max_ttl", 1200)  # the draft's proof lives ~18 minutes
    kw.setdefault("now", NOW)
    return WptVerifier(bundles, audiences=["https://workload.example.com"], **kw)


# -- our own issuer and workloads -------------------------------------------------------


@pytest.fixture(scope="module")
def store() -> MemoryKeyStore:
    s = MemoryKeyStore()
    s.create("issuer", "ES256")
    s.create("wl-store", "ES256")
    s.create("wl-store-ed", "EdDSA")
    return s


@pytest.fixture(scope="module")
def bundles(store: MemoryKeyStore) -> BundleSet:
    key = store.public_key("issuer")
    return BundleSet(
        [TrustBundle(EXAMPLE, jwt_authorities=(JwtAuthority("issuer", key, use="wit-svid"),))]
    )  # type: ignore[arg-type]


WL_KEY = ec.generate_private_key(ec.SECP256R1())
WL_JOSE = ECKey.import_key(WL_KEY)
SUB_A = WimseId.parse("wimse://example.com/svc/a")
SUB_B = WimseId.parse("wimse://example.com/svc/b")


def mint(
    store: MemoryKeyStore, subject: WimseId = SUB_A, key: Any = WL_KEY, alg: str = "ES256"
) -> str:
    jwk = {**public_jwk_members(key.public_key()), "alg": alg}
    return mint_wit(
        joserfc_key(store.get("issuer")),
        "ES256",
        "issuer",
        subject,
        jwk,
        timedelta(hours=1),
        now=NOW - 60,
    )


def hand_jws(header: dict[str, Any], claims: dict[str, Any], key: Any, alg: str = "ES256") -> str:
    """Made with cryptography only (independent of joserfc)."""
    si = (b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())).encode()
    if alg == "EdDSA":
        sig = key.sign(si)
    elif alg == "none":
        sig = b""
    elif alg == "HS256":
        import hmac

        sig = hmac.new(key, si, hashlib.sha256).digest()
    else:
        h = {"ES256": hashes.SHA256(), "ES384": hashes.SHA384()}[alg]
        r, s = decode_dss_signature(key.sign(si, ec.ECDSA(h)))
        size = (key.curve.key_size + 7) // 8
        sig = r.to_bytes(size, "big") + s.to_bytes(size, "big")
    return si.decode() + "." + b64(sig)


def hand_wpt(
    wit: str,
    *,
    header: dict[str, Any] | None = None,
    key: Any = WL_KEY,
    alg: str = "ES256",
    **changes: Any,
) -> str:
    claims: dict[str, Any] = {
        "aud": ORIGIN + "/pay",
        "exp": NOW + 60,
        "jti": b64(secrets.token_bytes(16)),
        "wth": token_hash(wit),
    }
    for name, value in changes.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return hand_jws(header or {"alg": "ES256", "typ": "wpt+jwt"}, claims, key, alg)


def req(
    wit: str | None,
    wpt: str | None,
    target: str = "/pay",
    wire: str = "wpt-02",
    extra: list[tuple[str, str]] | None = None,
) -> HttpMessage:
    headers: list[tuple[str, str]] = [("Host", "api.example.com")]
    if wit is not None:
        headers.append(("Workload-Identity-Token", wit))
    if wpt is not None:
        headers.append(
            ("Authorization", f"WPT {wpt}") if wire == "wpt-02" else ("Workload-Proof-Token", wpt)
        )
    headers.extend(extra or [])
    return HttpMessage.request("GET", target, headers)


def verifier(bundles: BundleSet, **kw: Any) -> WptVerifier:
    kw.setdefault("replay", RecordingReplayCache())
    kw.setdefault("now", NOW)
    kw.setdefault("audiences", [ORIGIN])
    return WptVerifier(bundles, **kw)


def wpt_code(v: WptVerifier, request: HttpMessage, audience: str | None = None) -> str:
    with pytest.raises(WptError) as info:
        v.verify(request, audience=audience)
    assert http_status(info.value) == 401 and challenge_for(info.value) == "WPT"
    assert info.value.code in WPT_ERROR_CODES
    return info.value.code


# -- the drafts' wpt-01 example ------------------------------------------------------------


def test_draft_wpt01_request_verifies() -> None:
    replay = RecordingReplayCache()
    caller = draft_verifier(replay=replay).verify(draft_request())
    assert str(caller.subject) == "wimse://example.com/specific-workload"
    assert caller.trust_domain == EXAMPLE
    assert caller.variant == "wpt" and caller.wire == "wpt-01"
    assert caller.wpt_claims["ath"] == token_hash(DRAFT_BEARER)
    # replay is tracked per sender, until exp + leeway
    assert replay.seen == {
        ("wpt:wimse://example.com/specific-workload", "__bwc4ESC3acc2LTC1-_x"): 1745510016 + 30
    }


def test_draft_wpt01_query_is_ignored_for_audience() -> None:
    assert draft_verifier().verify(draft_request(target="/path?x=1&y=2")).wire == "wpt-01"


def test_draft_wpt_exp_too_far_under_default_max_ttl() -> None:
    # the draft's proof expires 1016 s after our pinned now: "unreasonably far" for 300 s
    v = draft_verifier(max_ttl=300)
    assert wpt_code(v, draft_request()) == "wpt_exp_too_far"
    assert draft_verifier(max_ttl=300, now=1745509800).verify(draft_request()).wire == "wpt-01"


def _flip(token: str, part: int, index: int) -> str:
    parts = token.split(".")
    chars = list(parts[part])
    chars[index] = B64URL[(B64URL.index(chars[index]) + 1) % 64]
    parts[part] = "".join(chars)
    return ".".join(parts)


def every_one_character_change(token: str) -> list[str]:
    """``token`` with each character position in turn replaced by another
    base64url character (the replacement varies with the position, so every
    offset 1..63 of the alphabet is used across the token)."""
    out = []
    for i, ch in enumerate(token):
        if ch == ".":
            continue
        new = B64URL[(B64URL.index(ch) + 1 + i % 63) % 64]
        assert new != ch
        out.append(token[:i] + new + token[i + 1 :])
    return out


def test_draft_wpt_fails_when_any_byte_changes() -> None:
    """Every character of every part (header, claims, signature), not a sample."""
    verifier = draft_verifier()
    changed = every_one_character_change(DRAFT_WPT)
    assert len(changed) == len(DRAFT_WPT) - 2
    for token in changed:
        with pytest.raises(WptError):
            verifier.verify(draft_request(Workload_Proof_Token=token))
    # the unchanged proof still verifies with the same verifier
    assert verifier.verify(draft_request()).wire == "wpt-01"


@pytest.mark.parametrize("part", [0, 1, 2])
def test_draft_request_fails_when_the_wit_changes(part: int) -> None:
    with pytest.raises(WitError) as info:
        draft_verifier().verify(draft_request(Workload_Identity_Token=_flip(DRAFT_WIT, part, 11)))
    assert http_status(info.value) == 400


@pytest.mark.parametrize(
    ("change", "value"),
    [
        ("aud", "https://workload.example.com/other"),
        ("exp", 1745510017),
        ("jti", "x"),
        ("wth", "X9wiPgq3jlSGzAegHCGhNO1lJgUbDoI1Mjkat5QHJB0"),
        ("ath", None),
    ],
)
def test_draft_wpt_fails_when_a_claim_changes(change: str, value: Any) -> None:
    claims = json.loads(b64d(DRAFT_WPT.split(".")[1]))
    if value is None:
        del claims[change]
    else:
        claims[change] = value
    a, _, c = DRAFT_WPT.split(".")
    forged = f"{a}.{b64(json.dumps(claims).encode())}.{c}"
    assert (
        wpt_code(draft_verifier(), draft_request(Workload_Proof_Token=forged))
        == "wpt_bad_signature"
    )


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"Authorization": "Bearer 16_mAd0GiwaZokU26_0902101"}, "wpt_ath_mismatch"),
        ({"Authorization": None}, "wpt_ath_without_bearer"),
        ({"target": "/path2"}, "wpt_bad_audience"),
        ({"target": "/Path"}, "wpt_bad_audience"),
        ({"Txn_Token": "abc"}, "wpt_missing_tth"),
    ],
    ids=["bearer", "no-bearer", "path", "path-case", "unbound-txn-token"],
)
def test_draft_request_fails_when_a_header_changes(changes: dict[str, Any], code: str) -> None:
    assert wpt_code(draft_verifier(), draft_request(**changes)) == code


def test_draft_request_replayed() -> None:
    v = draft_verifier()
    v.verify(draft_request())
    with pytest.raises(WptReplayError) as info:
        v.verify(draft_request())
    assert info.value.code == "wpt_replayed" and http_status(info.value) == 401


def test_draft_wpt_is_reproducible_with_the_draft_keys() -> None:
    # The example's workload key is published: our create_wpt makes an equivalent proof.
    from joserfc.jwk import OKPKey

    d = b64d(DRAFT_WORKLOAD_D)
    signer = OKPKey.import_key(ed25519.Ed25519PrivateKey.from_private_bytes(d))
    wpt = create_wpt(
        signer,
        DRAFT_WIT,
        "https://workload.example.com/path?q=1#f",
        wire="wpt-01",
        access_token=DRAFT_BEARER,
        now=NOW,
    )
    claims = json.loads(b64d(wpt.split(".")[1]))
    assert claims["aud"] == "https://workload.example.com/path"
    assert claims["wth"] == "AaYUfC34D1di2FxQLpiIJJ7Sg8VZ6o8OCdwSf9IToLg"
    assert claims["ath"] == "CL4wjfpRmNf-bdYIbYLnV9d5rMARGwKYE10wUwzC0jI"
    assert draft_verifier().verify(draft_request(Workload_Proof_Token=wpt)).wire == "wpt-01"


# -- wpt-02 round trips, through a MemoryKeyStore key --------------------------------------


@pytest.mark.parametrize("name", ["wl-store", "wl-store-ed"])
def test_mint_wit_and_wpt_through_memory_keystore(
    store: MemoryKeyStore, bundles: BundleSet, name: str
) -> None:
    jwk = store.public_jwk(name)
    wit = mint_wit(
        joserfc_key(store.get("issuer")), "ES256", "issuer", SUB_A, jwk, timedelta(hours=1), now=NOW
    )
    wpt = create_wpt(joserfc_key(store.get(name)), wit, ORIGIN + "/pay?amount=3", now=NOW)
    header = json.loads(b64d(wpt.split(".")[0]))
    assert header == {"alg": jwk["alg"], "typ": "wpt+jwt"}
    claims = json.loads(b64d(wpt.split(".")[1]))
    assert set(claims) == {"aud", "exp", "jti", "wth"}
    assert claims["aud"] == ORIGIN + "/pay" and claims["exp"] == NOW + 60
    assert len(b64d(claims["jti"])) == 16
    request = HttpMessage.request("POST", "/pay?amount=3", wpt_headers(wit, wpt))
    caller = verifier(bundles).verify(request)
    assert caller.subject == SUB_A and caller.wire == "wpt-02"
    assert caller.wit_claims["sub"] == str(SUB_A)


def test_wpt01_roundtrip_with_access_token(store: MemoryKeyStore, bundles: BundleSet) -> None:
    wit = mint(store, key=WL_KEY)
    from joserfc.jwk import ECKey

    signer = ECKey.import_key(WL_KEY)
    wpt = create_wpt(signer, wit, ORIGIN + "/pay", wire="wpt-01", access_token="tok-1", now=NOW)
    headers = [*wpt_headers(wit, wpt, wire="wpt-01"), ("Authorization", "Bearer tok-1")]
    assert headers[1][0] == "Workload-Proof-Token"
    caller = verifier(bundles).verify(HttpMessage.request("GET", "/pay", headers))
    assert caller.wire == "wpt-01"


def test_roundtrip_with_txn_token_and_other_tokens(
    store: MemoryKeyStore, bundles: BundleSet
) -> None:
    from joserfc.jwk import ECKey

    wit = mint(store)
    wpt = create_wpt(
        ECKey.import_key(WL_KEY),
        wit,
        ORIGIN + "/pay",
        txn_token="txn.jwt.x",
        other_tokens={"X-User-Token": "  user-token-1 "},
        now=NOW,
    )
    claims = json.loads(b64d(wpt.split(".")[1]))
    assert claims["tth"] == token_hash("txn.jwt.x")
    assert claims["oth"] == {"x-user-token": token_hash("user-token-1")}
    request = req(wit, wpt, extra=[("Txn-Token", "txn.jwt.x"), ("x-user-token", "user-token-1")])
    caller = verifier(bundles, known_other_tokens=["X-User-Token"]).verify(request)
    assert caller.wpt_claims["tth"] == claims["tth"]


def test_create_wpt_refuses_misuse(store: MemoryKeyStore) -> None:
    from joserfc.jwk import ECKey

    wit = mint(store)
    right = ECKey.import_key(WL_KEY)
    wrong = ECKey.import_key(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(WptMintError) as info:
        create_wpt(wrong, wit, ORIGIN + "/pay")
    assert info.value.code == "wpt_mint_wrong_key"
    with pytest.raises(WptMintError):
        create_wpt(right, wit, ORIGIN + "/pay", access_token="at")  # wpt-02 has no ath
    for ttl in (0, -1, 3600):
        with pytest.raises(WptMintError):
            create_wpt(right, wit, ORIGIN + "/pay", ttl_seconds=ttl)
    with pytest.raises(WptMintError):
        create_wpt(right, "not-a-wit", ORIGIN + "/pay")
    with pytest.raises(WptMintError):
        create_wpt(right, wit, ORIGIN + "/pay", other_tokens={"Authorization": "x"})


def test_wit_verifier_cache_is_shared(store: MemoryKeyStore, bundles: BundleSet) -> None:
    wits = WitVerifier(bundles, now=NOW)
    v = WptVerifier(wit_verifier=wits, audiences=[ORIGIN], replay=RecordingReplayCache(), now=NOW)
    wit = mint(store)
    first = v.verify(req(wit, hand_wpt(wit)))
    second = v.verify(req(wit, hand_wpt(wit)))
    assert first.wit is second.wit and len(wits) == 1


# -- every receiver check, by name -----------------------------------------------------


def test_check_wit_header_exactly_one(store: MemoryKeyStore, bundles: BundleSet) -> None:
    wit = mint(store)
    wpt = hand_wpt(wit)
    for request, code in (
        (req(None, wpt), "wit_missing"),
        (req(wit, wpt, extra=[("workload-identity-token", wit)]), "wit_multiple"),
    ):
        with pytest.raises(WitError) as info:
            verifier(bundles).verify(request)
        assert info.value.code == code and http_status(info.value) == 400


def test_check_wit_verified_first(store: MemoryKeyStore, bundles: BundleSet) -> None:
    # a bad WIT is reported as such (400) even when the proof is bad too
    wit = mint(store)
    with pytest.raises(WitError) as info:
        verifier(bundles).verify(req(_flip(wit, 2, 4), "garbage", extra=[("Authorization", "x")]))
    assert http_status(info.value) == 400 and challenge_for(info.value) is None


def test_check_proof_present(store: MemoryKeyStore, bundles: BundleSet) -> None:
    wit = mint(store)
    assert wpt_code(verifier(bundles), req(wit, None)) == "wpt_missing"
    # a bearer token alone is not a proof of possession
    assert (
        wpt_code(verifier(bundles), req(wit, None, extra=[("Authorization", "Bearer abc")]))
        == "wpt_missing"
    )


@pytest.mark.parametrize("scheme", ["WPT", "wpt", "Wpt", "wPT"])
def test_check_scheme_case_insensitive(
    store: MemoryKeyStore, bundles: BundleSet, scheme: str
) -> None:
    wit = mint(store)
    request = req(wit, None, extra=[("Authorization", f"{scheme} {hand_wpt(wit)}")])
    assert verifier(bundles).verify(request).wire == "wpt-02"


def test_attack_two_authorization_headers(store: MemoryKeyStore, bundles: BundleSet) -> None:
    wit = mint(store)
    for second in (f"WPT {hand_wpt(wit)}", "Bearer abc", "Basic dTpw"):
        request = req(wit, hand_wpt(wit), extra=[("authorization", second)])
        assert wpt_code(verifier(bundles), request) == "wpt_multiple_authorization"


def test_attack_two_authorization_values_merged_by_wsgi(
    store: MemoryKeyStore, bundles: BundleSet
) -> None:
    wit = mint(store)
    merged = f"WPT {hand_wpt(wit)}, WPT {hand_wpt(wit)}"
    assert (
        wpt_code(verifier(bundles), req(wit, None, extra=[("Authorization", merged)]))
        == "wpt_malformed"
    )
    assert (
        wpt_code(verifier(bundles), req(wit, None, extra=[("Authorization", "WPT")]))
        == "wpt_malformed"
    )


def test_attack_both_wire_forms_at_once(store: MemoryKeyStore, bundles: BundleSet) -> None:
    wit = mint(store)
    request = req(wit, hand_wpt(wit), extra=[("Workload-Proof-Token", hand_wpt(wit))])
    assert wpt_code(verifier(bundles), request) == "wpt_both_forms"


def test_check_wpt01_switch_and_single_header(store: MemoryKeyStore, bundles: BundleSet) -> None:
    wit = mint(store)
    assert (
        wpt_code(verifier(bundles, accept_wpt01=False), req(wit, hand_wpt(wit), wire="wpt-01"))
        == "wpt01_not_accepted"
    )
    assert verifier(bundles).verify(req(wit, hand_wpt(wit), wire="wpt-01")).wire == "wpt-01"
    two = req(wit, hand_wpt(wit), wire="wpt-01", extra=[("Workload-Proof-Token", hand_wpt(wit))])
    assert wpt_code(verifier(bundles), two) == "wpt_multiple_proofs"


def test_attack_bearer_smuggled_next_to_wpt01_without_ath(
    store: MemoryKeyStore, bundles: BundleSet
) -> None:
    wit = mint(store)
    request = req(wit, hand_wpt(wit), wire="wpt-01", extra=[("Authorization", "Bearer stolen")])
    assert wpt_code(verifier(bundles), request) == "wpt_missing_ath"
    other = req(
        wit,
        hand_wpt(wit, ath=token_hash("mine")),
        wire="wpt-01",
        extra=[("Authorization", "Bearer stolen")],
    )
    assert wpt_code(verifier(bundles), other) == "wpt_ath_mismatch"
    basic = req(wit, hand_wpt(wit), wire="wpt-01", extra=[("Authorization", "Basic dTpw")])
    assert wpt_code(verifier(bundles), basic) == "wpt_unexpected_authorization"


def test_check_ath_without_bearer(store: MemoryKeyStore, bundles: BundleSet) -> None:
    wit = mint(store)
    wpt = hand_wpt(wit, ath=token_hash("at"))
    assert wpt_code(verifier(bundles), req(wit, wpt, wire="wpt-01")) == "wpt_ath_without_bearer"
    # wpt-02 has no ath at all (the Authorization field holds the proof)
    assert (
        wpt_code(verifier(bundles), req(wit, hand_wpt(wit, ath=token_hash("at"))))
        == "wpt_ath_without_bearer"
    )


@pytest.mark.parametrize("typ", [None, "JWT", "wit+jwt", "dpop+jwt"])
def test_check_typ(store: MemoryKeyStore, bundles: BundleSet, typ: str | None) -> None:
    wit = mint(store)
    header = {"alg": "ES256"} | ({"typ": typ} if typ else {})
    assert wpt_code(verifier(bundles), req(wit, hand_wpt(wit, header=header))) == "wpt_bad_typ"


def test_typ_application_prefix_accepted(store: MemoryKeyStore, bundles: BundleSet) -> None:
    wit = mint(store)
    wpt = hand_wpt(wit, header={"alg": "ES256", "typ": "application/wpt+jwt"})
    assert verifier(bundles).verify(req(wit, wpt)).wire == "wpt-02"


def test_attack_alg_none_and_hmac(store: MemoryKeyStore, bundles: BundleSet) -> None:
    wit = mint(store)
    none = hand_wpt(wit, header={"alg": "none", "typ": "wpt+jwt"}, key=None, alg="none")
    assert wpt_code(verifier(bundles), req(wit, none)) == "wpt_bad_alg"
    assert wpt_code(verifier(bundles), req(wit, none + "c2ln")) == "wpt_bad_alg"
    pem_secret = json.dumps(public_jwk_members(WL_KEY.public_key())).encode()
    hs = hand_wpt(wit, header={"alg": "HS256", "typ": "wpt+jwt"}, key=pem_secret, alg="HS256")
    assert wpt_code(verifier(bundles), req(wit, hs)) == "wpt_bad_alg"


def test_attack_mismatched_alg(store: MemoryKeyStore, bundles: BundleSet) -> None:
    # the WIT binds an ES256 key; a proof in ES384 (any key) is refused before its signature
    wit = mint(store)
    p384 = ec.generate_private_key(ec.SECP384R1())
    wpt = hand_wpt(wit, header={"alg": "ES384", "typ": "wpt+jwt"}, key=p384, alg="ES384")
    assert wpt_code(verifier(bundles), req(wit, wpt)) == "wpt_alg_mismatch"


def test_check_signature_with_cnf_key(store: MemoryKeyStore, bundles: BundleSet) -> None:
    wit = mint(store)
    thief = ec.generate_private_key(ec.SECP256R1())
    assert wpt_code(verifier(bundles), req(wit, hand_wpt(wit, key=thief))) == "wpt_bad_signature"


def test_check_audience(store: MemoryKeyStore, bundles: BundleSet) -> None:
    wit = mint(store)
    for aud in (None, [ORIGIN + "/pay"], "https://other.example.com/pay", ORIGIN + "/pay/"):
        assert wpt_code(verifier(bundles), req(wit, hand_wpt(wit, aud=aud))) == "wpt_bad_audience"


def test_attack_host_header_is_never_used_for_audience(
    store: MemoryKeyStore, bundles: BundleSet
) -> None:
    wit = mint(store)
    evil = hand_wpt(wit, aud="https://evil.example/pay")
    request = req(wit, evil, extra=[("Host", "evil.example"), ("X-Forwarded-Host", "evil.example")])
    assert wpt_code(verifier(bundles), request) == "wpt_bad_audience"
    good = req(wit, hand_wpt(wit), extra=[("X-Forwarded-Host", "evil.example")])
    assert verifier(bundles).verify(good).wire == "wpt-02"


def test_audiences_from_endpoint_config(store: MemoryKeyStore, bundles: BundleSet) -> None:
    wit = mint(store)
    v = verifier(
        bundles,
        audiences=[
            Endpoint("https", "api.example.com", 443),
            Endpoint("https", "api.example.com", 8443),
        ],
    )
    assert v.verify(req(wit, hand_wpt(wit))).wire == "wpt-02"
    assert v.verify(req(wit, hand_wpt(wit, aud=ORIGIN + ":8443/pay"))).wire == "wpt-02"


def test_check_exp(store: MemoryKeyStore, bundles: BundleSet) -> None:
    wit = mint(store)
    v = verifier(bundles)
    assert wpt_code(v, req(wit, hand_wpt(wit, exp=None))) == "wpt_missing_exp"
    assert wpt_code(v, req(wit, hand_wpt(wit, exp="soon"))) == "wpt_malformed"
    assert wpt_code(v, req(wit, hand_wpt(wit, exp=NOW - 31))) == "wpt_expired"
    assert v.verify(req(wit, hand_wpt(wit, exp=NOW - 29))).wire == "wpt-02"  # leeway 30


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", [10**400, -(10**400), 2**63])
def test_huge_integer_dates_are_malformed_not_a_crash(
    store: MemoryKeyStore, bundles: BundleSet, claim: str, value: int
) -> None:
    # A signed WPT whose date cannot become a float: a clear 401, never an
    # OverflowError (a 500 with a traceback in the server's log).
    wit = mint(store)
    assert wpt_code(verifier(bundles), req(wit, hand_wpt(wit, **{claim: value}))) == "wpt_malformed"


def test_attack_far_future_exp(store: MemoryKeyStore, bundles: BundleSet) -> None:
    wit = mint(store)
    v = verifier(bundles)
    assert wpt_code(v, req(wit, hand_wpt(wit, exp=NOW + 86400))) == "wpt_exp_too_far"
    assert wpt_code(v, req(wit, hand_wpt(wit, exp=NOW + 300 + 31))) == "wpt_exp_too_far"
    assert v.verify(req(wit, hand_wpt(wit, exp=NOW + 300))).wire == "wpt-02"


def test_attack_expired_wit(store: MemoryKeyStore, bundles: BundleSet) -> None:
    wit = mint(store)  # valid NOW-60 .. NOW+3540
    with pytest.raises(WitError) as info:
        verifier(bundles, now=NOW + 3540 + 61).verify(req(wit, hand_wpt(wit, exp=NOW + 3600)))
    assert info.value.code == "wit_expired"


def test_attack_wrong_wth(store: MemoryKeyStore, bundles: BundleSet) -> None:
    wit = mint(store)
    other_wit = mint(store)  # same key and subject, another WIT
    v = verifier(bundles)
    assert wpt_code(v, req(wit, hand_wpt(wit, wth=None))) == "wpt_missing_wth"
    assert wpt_code(v, req(wit, hand_wpt(wit, wth=token_hash(other_wit)))) == "wpt_wth_mismatch"
    assert wpt_code(v, req(wit, hand_wpt(wit, wth=42))) == "wpt_wth_mismatch"


def test_check_jti_present(store: MemoryKeyStore, bundles: BundleSet) -> None:
    wit = mint(store)
    for jti in (None, "", 7, "x" * 300):
        assert wpt_code(verifier(bundles), req(wit, hand_wpt(wit, jti=jti))) == "wpt_missing_jti"


def test_attack_replayed_jti_is_per_sender(store: MemoryKeyStore, bundles: BundleSet) -> None:
    wit_a = mint(store, SUB_A)
    wit_b = mint(store, SUB_B)
    replay = MemoryReplayCache(clock=lambda: NOW)
    v = verifier(bundles, replay=replay)
    assert v.verify(req(wit_a, hand_wpt(wit_a, jti="same"))).subject == SUB_A
    # the same jti from another sender is not a replay
    assert v.verify(req(wit_b, hand_wpt(wit_b, jti="same"))).subject == SUB_B
    with pytest.raises(WptReplayError):
        v.verify(req(wit_a, hand_wpt(wit_a, jti="same")))


def test_failed_proof_does_not_use_up_its_jti(store: MemoryKeyStore, bundles: BundleSet) -> None:
    wit = mint(store)
    replay = RecordingReplayCache()
    v = verifier(bundles, replay=replay)
    wpt = hand_wpt(wit)
    assert wpt_code(v, req(wit, wpt, extra=[("Txn-Token", "t")])) == "wpt_missing_tth"
    assert replay.seen == {}
    assert v.verify(req(wit, wpt)).wire == "wpt-02"


def test_check_txn_token(store: MemoryKeyStore, bundles: BundleSet) -> None:
    wit = mint(store)
    v = verifier(bundles)
    tth = token_hash("txn-1")
    assert v.verify(req(wit, hand_wpt(wit, tth=tth), extra=[("Txn-Token", "txn-1")]))
    assert wpt_code(v, req(wit, hand_wpt(wit), extra=[("Txn-Token", "txn-1")])) == "wpt_missing_tth"
    assert wpt_code(v, req(wit, hand_wpt(wit, tth=tth))) == "wpt_tth_without_txn_token"
    assert (
        wpt_code(v, req(wit, hand_wpt(wit, tth=tth), extra=[("Txn-Token", "txn-2")]))
        == "wpt_tth_mismatch"
    )
    two = [("Txn-Token", "txn-1"), ("txn-token", "txn-1")]
    assert wpt_code(v, req(wit, hand_wpt(wit, tth=tth), extra=two)) == "wpt_multiple_txn_tokens"


def test_check_other_tokens(store: MemoryKeyStore, bundles: BundleSet) -> None:
    wit = mint(store)
    v = verifier(bundles, known_other_tokens=["x-user-token"])
    oth = {"x-user-token": token_hash("u1")}
    assert v.verify(req(wit, hand_wpt(wit, oth=oth), extra=[("X-User-Token", " u1 ")]))
    assert (
        wpt_code(v, req(wit, hand_wpt(wit, oth=oth), extra=[("X-User-Token", "u2")]))
        == "wpt_oth_mismatch"
    )
    assert wpt_code(v, req(wit, hand_wpt(wit, oth=oth))) == "wpt_oth_mismatch"  # header absent
    # a known context token the proof does not bind
    assert wpt_code(v, req(wit, hand_wpt(wit), extra=[("X-User-Token", "u1")])) == "wpt_oth_missing"
    assert wpt_code(v, req(wit, hand_wpt(wit, oth=["x"]))) == "wpt_bad_oth"


def test_attack_unknown_oth_entries(store: MemoryKeyStore, bundles: BundleSet) -> None:
    wit = mint(store)
    v = verifier(bundles, known_other_tokens=["x-user-token"])
    oth = {"x-user-token": token_hash("u1"), "x-mystery": token_hash("m")}
    request = req(wit, hand_wpt(wit, oth=oth), extra=[("X-User-Token", "u1"), ("X-Mystery", "m")])
    assert wpt_code(v, request) == "wpt_oth_unknown"
    upper = {"X-User-Token": token_hash("u1")}  # names must be lowercase
    assert (
        wpt_code(v, req(wit, hand_wpt(wit, oth=upper), extra=[("X-User-Token", "u1")]))
        == "wpt_oth_unknown"
    )


def test_check_structure_and_size(store: MemoryKeyStore, bundles: BundleSet) -> None:
    wit = mint(store)
    v = verifier(bundles)
    assert wpt_code(v, req(wit, "a.b")) == "wpt_malformed"
    assert wpt_code(v, req(wit, hand_wpt(wit, pad="x" * 9000))) == "wpt_too_large"
    assert (
        wpt_code(
            v, req(wit, hand_wpt(wit, header={"alg": "ES256", "typ": "wpt+jwt", "crit": ["b64"]}))
        )
        == "wpt_malformed"
    )


# -- path & audience confusion ----------------------------------------------------------

PATH_TRICKS = [
    # (request target, aud in the proof)
    ("/payroll", ORIGIN + "/pay"),
    ("/pay", ORIGIN + "/payroll"),
    ("/pay/../admin", ORIGIN + "/pay/../admin"),
    ("/./pay", ORIGIN + "/./pay"),
    ("/pay/.", ORIGIN + "/pay/."),
    ("/%2e%2e/admin", ORIGIN + "/%2e%2e/admin"),
    ("/%2E%2E/admin", ORIGIN + "/%2E%2E/admin"),
    ("/%2Epay", ORIGIN + "/%2Epay"),
    ("/pay%2fadmin", ORIGIN + "/pay%2fadmin"),
    ("/pay%2Fadmin", ORIGIN + "/pay%2Fadmin"),
    ("/pay%5cadmin", ORIGIN + "/pay%5cadmin"),
    ("/pay\\admin", ORIGIN + "/pay\\admin"),
    ("/%252e%252e/admin", ORIGIN + "/%252e%252e/admin"),
    ("/pay/..;/admin", ORIGIN + "/pay/..;/admin"),
    ("/pay//admin", ORIGIN + "/pay//admin"),
    ("/pay", "https://api.example.com./pay"),
    ("/", "https://api.example.com"),
    ("", "https://api.example.com"),
    ("/pay", "http://api.example.com/pay"),
    ("/pay", "https://api.example.com:8443/pay"),
    ("/pay", "https://api.example.com:443/pay"),
    ("/pay", "https://user@api.example.com/pay"),
    ("/pay", "https://API.example.com/pay"),
    ("/pay", ORIGIN + "/pay#frag"),
    ("/pay", ORIGIN + "/pay?x=1"),
    ("https://api.example.com/pay", ORIGIN + "/pay"),
    ("*", ORIGIN + "/pay"),
]


@pytest.mark.parametrize(
    ("target", "aud"),
    PATH_TRICKS,
    ids=[
        "prefix",
        "longer-aud",
        "dotdot",
        "dot",
        "trailing-dot-seg",
        "enc-dotdot",
        "enc-dotdot-upper",
        "enc-dot",
        "enc-slash",
        "enc-slash-upper",
        "enc-backslash",
        "backslash",
        "double-enc",
        "dotdot-semicolon",
        "empty-segment",
        "trailing-dot-host",
        "empty-path",
        "empty-target",
        "scheme",
        "port",
        "default-port-spelled",
        "userinfo",
        "host-case",
        "fragment",
        "query",
        "absolute-form-target",
        "asterisk-target",
    ],
)
def test_attack_path_and_audience_confusion(
    store: MemoryKeyStore, bundles: BundleSet, target: str, aud: str
) -> None:
    wit = mint(store)
    with pytest.raises(WimseError) as info:
        verifier(bundles).verify(req(wit, hand_wpt(wit, aud=aud), target=target))
    assert info.value.code in {"wpt_bad_audience", "unsafe_request_target"}
    if info.value.code == "unsafe_request_target":
        assert isinstance(info.value, MalformedRequestError) and http_status(info.value) == 400


def test_exact_path_matches(store: MemoryKeyStore, bundles: BundleSet) -> None:
    wit = mint(store)
    v = verifier(bundles)
    for target in ("/", "/pay", "/pay/", "/a/b.c/d", "/a%20b", "/pay?x=../..", "/~user/x"):
        aud = ORIGIN + target.split("?")[0]
        assert v.verify(req(wit, hand_wpt(wit, aud=aud), target=target)).wire == "wpt-02"


@pytest.mark.parametrize(
    "origin",
    [
        "https://u@api.example.com",
        "https://api.example.com/",
        "https://api.example.com/x",
        "https://api.example.com.",
        "ftp://api.example.com",
        "https://api.example.com?x",
        "api.example.com",
    ],
)
def test_audience_config_is_validated(origin: str) -> None:
    with pytest.raises(ValueError):
        normalize_origin(origin)


def test_audience_config_normalised() -> None:
    assert normalize_origin("HTTPS://API.Example.com:443") == "https://api.example.com"
    assert normalize_origin("http://h:8080") == "http://h:8080"
    assert normalize_origin(Endpoint("https", "h", 443)) == "https://h"


# -- secrecy ---------------------------------------------------------------------------


def test_tokens_never_reach_logs_or_errors(
    store: MemoryKeyStore, bundles: BundleSet, caplog: pytest.LogCaptureFixture
) -> None:
    from custos.wimse.verifier import RequestVerifier

    wit = mint(store)
    v = verifier(bundles)
    bad = [
        req(wit, hand_wpt(wit, key=ec.generate_private_key(ec.SECP256R1()))),
        req(wit, hand_wpt(wit, aud="https://evil.example/pay")),
        req(_flip(wit, 2, 3), hand_wpt(wit)),
        req(wit, hand_wpt(wit, exp=NOW - 100)),
    ]
    caplog.set_level(logging.DEBUG)
    for request in bad:
        secrets_in_request = [v2 for _, v2 in request.headers if "." in v2]
        with pytest.raises(WimseError) as info:
            RequestVerifier(wpt=v).verify(request)
        texts = [caplog.text, str(info.value), repr(info.value)]
        cause = info.value.__cause__
        while cause is not None:
            texts.append(str(cause))
            cause = cause.__cause__
        for secret in secrets_in_request:
            for piece in secret.removeprefix("WPT ").split("."):
                for text in texts:
                    assert piece not in text


# -- interop ---------------------------------------------------------------------------


def test_our_wpt_verifies_with_pyjwt_and_jwcrypto(store: MemoryKeyStore) -> None:
    from joserfc.jwk import ECKey

    wit = mint(store)
    wpt = create_wpt(ECKey.import_key(WL_KEY), wit, ORIGIN + "/pay", txn_token="t")
    claims = pyjwt.decode(wpt, WL_KEY.public_key(), algorithms=["ES256"], audience=ORIGIN + "/pay")
    assert claims["wth"] == token_hash(wit) and claims["tth"] == token_hash("t")
    assert pyjwt.get_unverified_header(wpt) == {"alg": "ES256", "typ": "wpt+jwt"}
    key = jwcrypto.jwk.JWK(**public_jwk_members(WL_KEY.public_key()))
    sig = jwcrypto.jws.JWS()
    sig.deserialize(wpt, key=key, alg="ES256")
    assert json.loads(sig.payload)["aud"] == ORIGIN + "/pay"


def test_independently_made_wit_and_wpt_verify_with_ours() -> None:
    # Issuer and workload keys and both tokens built with cryptography alone.
    issuer = ec.generate_private_key(ec.SECP256R1())
    workload = ed25519.Ed25519PrivateKey.generate()
    wit = hand_jws(
        {"alg": "ES256", "kid": "ext-1", "typ": "wit+jwt"},
        {
            "sub": "spiffe://example.com/ext",
            "exp": NOW + 600,
            "iat": NOW,
            "cnf": {"jwk": {**public_jwk_members(workload.public_key()), "alg": "EdDSA"}},
        },
        issuer,
    )
    wpt = hand_jws(
        {"alg": "EdDSA", "typ": "wpt+jwt"},
        {"aud": ORIGIN + "/pay", "exp": NOW + 30, "jti": "ext-jti", "wth": token_hash(wit)},
        workload,
        "EdDSA",
    )
    bundles = BundleSet(
        [TrustBundle(EXAMPLE, jwt_authorities=(JwtAuthority("ext-1", issuer.public_key()),))]
    )
    caller = verifier(bundles).verify(req(wit, wpt))
    assert str(caller.subject) == "spiffe://example.com/ext"


# -- property: garbage never verifies and only WimseErrors escape ------------------------

_header_values = st.one_of(
    st.text(max_size=80),
    st.lists(st.text(alphabet=B64URL, max_size=30), min_size=1, max_size=4).map(".".join),
)


@settings(
    max_examples=150,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    deadline=None,
)
@given(
    wit=st.one_of(st.none(), _header_values, st.just(DRAFT_WIT)),
    auth=st.one_of(st.none(), _header_values, _header_values.map(lambda s: "WPT " + s)),
    proof=st.one_of(st.none(), _header_values, st.just(DRAFT_WPT)),
    target=st.one_of(st.text(max_size=30), st.just("/path")),
)
def test_property_verifier_only_raises_wimse_errors(
    wit: str | None, auth: str | None, proof: str | None, target: str
) -> None:
    headers = [
        (n, v)
        for n, v in (
            ("Workload-Identity-Token", wit),
            ("Authorization", auth),
            ("Workload-Proof-Token", proof),
        )
        if v is not None
    ]
    request = HttpMessage.request("POST", target, headers)
    with pytest.raises(WimseError):
        draft_verifier(replay=RecordingReplayCache()).verify(request)


# -- audit findings: nbf / iat, pinned clocks and the replay cache ----------------------


def test_wpt_nbf_in_the_future_is_refused(store: MemoryKeyStore, bundles: BundleSet) -> None:
    """A proof that says it is not valid for hours yet must not be accepted now."""
    wit = mint(store)
    got = wpt_code(verifier(bundles), req(wit, hand_wpt(wit, nbf=NOW + 10000)))
    assert got == "wpt_not_yet_valid"


def test_wpt_iat_in_the_future_is_refused(store: MemoryKeyStore, bundles: BundleSet) -> None:
    wit = mint(store)
    got = wpt_code(verifier(bundles), req(wit, hand_wpt(wit, iat=NOW + 10000)))
    assert got == "wpt_iat_in_future"


def test_wpt_nbf_and_iat_within_the_leeway_are_accepted(
    store: MemoryKeyStore, bundles: BundleSet
) -> None:
    wit = mint(store)
    v = verifier(bundles, leeway=30)
    assert v.verify(req(wit, hand_wpt(wit, nbf=NOW + 29, iat=NOW + 29))).variant == "wpt"
    assert v.verify(req(wit, hand_wpt(wit, nbf=NOW - 5, iat=NOW - 5))).variant == "wpt"
    assert wpt_code(v, req(wit, hand_wpt(wit, nbf=NOW + 31))) == "wpt_not_yet_valid"
    assert wpt_code(v, req(wit, hand_wpt(wit, iat=NOW + 31))) == "wpt_iat_in_future"


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_wpt_nbf_and_iat_must_be_numeric_dates(
    store: MemoryKeyStore, bundles: BundleSet, claim: str
) -> None:
    wit = mint(store)
    token = hand_wpt(wit, **{claim: str(NOW)})
    assert wpt_code(verifier(bundles), req(wit, token)) == "wpt_malformed"


def test_wpt_time_checks_run_in_the_documented_order(
    store: MemoryKeyStore, bundles: BundleSet
) -> None:
    # exp before nbf before iat, as the module docstring lists them
    wit = mint(store)
    v = verifier(bundles)
    both = hand_wpt(wit, exp=NOW - 100, nbf=NOW + 10000, iat=NOW + 10000)
    assert wpt_code(v, req(wit, both)) == "wpt_expired"
    assert wpt_code(v, req(wit, hand_wpt(wit, nbf=NOW + 10000, iat=NOW + 10000))) == (
        "wpt_not_yet_valid"
    )
    import custos.wimse.wpt as wpt_module

    doc = " ".join((wpt_module.__doc__ or "").split())
    assert "``exp``, ``nbf``, ``iat``, ``wth``" in doc


def test_pinned_verifier_with_a_real_clock_memory_cache_catches_replays(
    store: MemoryKeyStore, bundles: BundleSet
) -> None:
    """NOW is in the past: a cache on the real clock would take the entry as
    expired at once and let the replay through."""
    wit = mint(store)
    v = WptVerifier(bundles, audiences=[ORIGIN], replay=MemoryReplayCache(), now=NOW)
    request = req(wit, hand_wpt(wit))
    v.verify(request)
    with pytest.raises(WptReplayError):
        v.verify(request)


# -- issue 7: exact, non-HTTP audiences ------------------------------------------------------

AGENT_API = "spiffe://example.com/custos/server/agent/Attest"


def grpc_like(wit: str, wpt: str) -> HttpMessage:
    """A call that is not an HTTP request: metadata as headers, no target."""
    return HttpMessage(tuple(wpt_headers(wit, wpt)))


def test_exact_audience_configured(store: MemoryKeyStore, bundles: BundleSet) -> None:
    wit = mint(store)
    v = verifier(bundles, audiences=(), exact_audiences=[AGENT_API])
    assert v.verify(grpc_like(wit, hand_wpt(wit, aud=AGENT_API))).subject == SUB_A
    # exact: no prefix, no case folding, no trailing slash, no origin + path
    for aud in (AGENT_API + "/x", AGENT_API.upper(), AGENT_API + "/", ORIGIN + "/pay"):
        assert wpt_code(v, grpc_like(wit, hand_wpt(wit, aud=aud))) == "wpt_bad_audience"
    # same replay check as any other proof
    proof = hand_wpt(wit, aud=AGENT_API)
    v.verify(grpc_like(wit, proof))
    assert wpt_code(v, grpc_like(wit, proof)) == "wpt_replayed"
    # same binding checks: the proof names another WIT
    other = mint(store, SUB_B)
    assert wpt_code(v, grpc_like(other, hand_wpt(wit, aud=AGENT_API))) == "wpt_wth_mismatch"


def test_exact_audience_next_to_origins(store: MemoryKeyStore, bundles: BundleSet) -> None:
    wit = mint(store)
    v = verifier(bundles, exact_audiences=["urn:example:payments"])
    assert v.verify(req(wit, hand_wpt(wit))).wire == "wpt-02"  # origin + path
    assert v.verify(req(wit, hand_wpt(wit, aud="urn:example:payments"))).wire == "wpt-02"
    # the request target is still checked when there is one
    with pytest.raises(MalformedRequestError):
        v.verify(req(wit, hand_wpt(wit, aud="urn:example:payments"), target="/a/../pay"))
    # a message without a target can match an exact audience only
    assert wpt_code(v, grpc_like(wit, hand_wpt(wit))) == "wpt_bad_audience"


def test_per_call_audience(store: MemoryKeyStore, bundles: BundleSet) -> None:
    wit = mint(store)
    v = verifier(bundles)
    method = "spiffe://example.com/custos/server/agent/FetchEntries"
    proof = hand_wpt(wit, aud=method)
    assert wpt_code(v, grpc_like(wit, proof)) == "wpt_bad_audience"  # not configured
    assert v.verify(grpc_like(wit, proof), audience=method).subject == SUB_A
    # the configured origin does not stand in for the per-call audience
    assert wpt_code(v, grpc_like(wit, hand_wpt(wit)), audience=method) == "wpt_bad_audience"
    with pytest.raises(WptError) as info:
        v.verify(grpc_like(wit, hand_wpt(wit, aud=method)), audience=AGENT_API)
    assert info.value.code == "wpt_bad_audience"


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "no-scheme",
        "/relative",
        "spiffe://example.com/a#frag",
        "spiffe://example.com/a b",
        "spiffe://bücher.example/a",
        "x" * 3000,
        42,
    ],
)
def test_exact_audience_must_be_an_absolute_ascii_uri(bundles: BundleSet, bad: Any) -> None:
    with pytest.raises(WptConfigError) as info:
        verifier(bundles, exact_audiences=[bad])
    assert isinstance(info.value, CustosError) and isinstance(info.value, ValueError)
    with pytest.raises(WptConfigError):
        verifier(bundles).verify(HttpMessage(), audience=bad)


@pytest.mark.parametrize("http_aud", [ORIGIN, ORIGIN + "/", ORIGIN + "/pay", "HTTP://api.example.com"])
def test_an_http_uri_is_never_an_exact_wpt_audience(bundles: BundleSet, http_aud: str) -> None:
    # Review of issue 7: an exact audience is compared without the request path, and a
    # WPT binds the path only through aud: an origin as exact audience made one proof
    # good on every route (/public and /admin/delete alike).
    with pytest.raises(WptConfigError, match="http"):
        verifier(bundles, exact_audiences=[http_aud])


def test_build_request_verifier_keeps_http_exact_audiences_from_wpts(
    store: MemoryKeyStore, bundles: BundleSet
) -> None:
    from custos.wimse.verifier import build_request_verifier

    wit = mint(store)
    # The HTTP-signature variant signs @path, so it may keep an agreed http(s) wimse-aud;
    # the WPT variant must not take it.
    v = build_request_verifier(bundles, [ORIGIN], exact_audiences=[ORIGIN], now=NOW)
    for target in ("/public", "/admin/delete"):
        with pytest.raises(WptError) as info:
            v.verify(req(wit, hand_wpt(wit, aud=ORIGIN), target=target))
        assert info.value.code == "wpt_bad_audience"
    assert v.verify(req(wit, hand_wpt(wit, aud=ORIGIN + "/pay"))).subject == str(SUB_A)


def test_no_audience_at_all_is_a_config_error(bundles: BundleSet) -> None:
    with pytest.raises(ValueError):
        verifier(bundles, audiences=())


# -- issue 7: hostile inputs -----------------------------------------------------------------


def test_attack_lone_surrogate_aud_against_a_non_ascii_origin(
    store: MemoryKeyStore, bundles: BundleSet
) -> None:
    # item 12: a clear refusal, never a UnicodeEncodeError (a 500)
    wit = mint(store)
    v = verifier(bundles, audiences=["https://bücher.example"])
    for aud in (
        "https://bücher.example/pay\ud800",
        "\udc00",
        "https://xn--bcher-kva.example/pay\ud800",
    ):
        proof = hand_wpt(wit, aud=aud)
        with pytest.raises(WptError) as info:
            v.verify(req(wit, proof))
        assert info.value.code in {"wpt_bad_audience", "wpt_malformed"}
    assert v.verify(req(wit, hand_wpt(wit, aud="https://xn--bcher-kva.example/pay"))).subject


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), True])
@pytest.mark.parametrize("name", ["now", "leeway", "max_ttl"])
def test_wpt_verifier_refuses_non_finite_numbers(bundles: BundleSet, name: str, bad: Any) -> None:
    # item 11: NaN compares false with everything, inf passes every "<=":
    # either would turn the time checks off.
    with pytest.raises(CustosError):
        verifier(bundles, **{name: bad})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_build_request_verifier_refuses_non_finite_numbers(bundles: BundleSet, bad: float) -> None:
    from custos.wimse.verifier import build_request_verifier

    with pytest.raises(CustosError):
        build_request_verifier(bundles, [ORIGIN], now=bad)
    with pytest.raises(CustosError):
        build_request_verifier(bundles, [ORIGIN], wpt_max_ttl=bad)


def test_wpt_times_as_timedelta(bundles: BundleSet) -> None:
    v = verifier(bundles, leeway=timedelta(seconds=5), max_ttl=timedelta(minutes=2))
    assert (v.leeway, v.max_ttl) == (5, 120)


def test_attack_proof_bound_to_a_small_order_key_is_refused(bundles: BundleSet) -> None:
    # item 7, end to end: a WIT from the trusted issuer binding the Ed25519
    # identity point, and a "proof" whose signature was made with no key at
    # all (R = identity, S = 0 verifies against that point for any message).
    issuer = MemoryKeyStore()
    issuer.create("issuer", "ES256")
    trusted = BundleSet(
        [
            TrustBundle(
                EXAMPLE,
                jwt_authorities=(
                    JwtAuthority("issuer", issuer.public_key("issuer"), use="wit-svid"),
                ),  # type: ignore[arg-type]
            )
        ]
    )
    point = b64(bytes([1]) + bytes(31))
    claims = {
        "sub": str(SUB_A),
        "exp": NOW + 3600,
        "iat": NOW - 60,
        "cnf": {"jwk": {"kty": "OKP", "crv": "Ed25519", "x": point, "alg": "EdDSA"}},
    }
    head = b64(json.dumps({"alg": "ES256", "kid": "issuer", "typ": "wit+jwt"}).encode())
    si = f"{head}.{b64(json.dumps(claims).encode())}"
    wit = f"{si}.{b64(issuer.sign('issuer', si.encode()))}"
    proof_claims = {"aud": ORIGIN + "/pay", "exp": NOW + 60, "jti": "j", "wth": token_hash(wit)}
    proof_si = (
        b64(json.dumps({"alg": "EdDSA", "typ": "wpt+jwt"}).encode())
        + "."
        + b64(json.dumps(proof_claims).encode())
    )
    keyless = b64(bytes([1]) + bytes(31) + bytes(32))
    v = verifier(trusted)
    with pytest.raises(WitError) as info:
        v.verify(req(wit, f"{proof_si}.{keyless}"))
    assert info.value.code == "wit_weak_cnf"
    # and a sender cannot make one either
    with pytest.raises(WptMintError):
        create_wpt(joserfc_key(issuer.get("issuer")), wit, ORIGIN + "/pay")


def test_verifier_reads_headers_through_the_public_lookup(
    store: MemoryKeyStore, bundles: BundleSet
) -> None:
    # Header names in any case, as a framework hands them over.
    wit = mint(store)
    request = HttpMessage.request(
        "GET",
        "/pay",
        [("WORKLOAD-IDENTITY-TOKEN", wit), ("authorization", f"WPT {hand_wpt(wit)}")],
    )
    assert verifier(bundles).verify(request).subject == SUB_A


# -- issue 7: what a new user has ---------------------------------------------------------


def test_create_wpt_takes_a_store_key_and_a_timedelta(store: MemoryKeyStore) -> None:
    wit = mint_wit(
        store.get("issuer"),
        subject="wimse://example.com/svc/store",
        workload_public_jwk=store.get("wl-store"),
        ttl=timedelta(hours=1),
        now=NOW - 60,
    )
    proof = create_wpt(
        store.get("wl-store"), wit, ORIGIN + "/pay", ttl_seconds=timedelta(seconds=30), now=NOW
    )
    claims = json.loads(b64d(proof.split(".")[1]))
    assert claims["exp"] == NOW + 30


@pytest.mark.parametrize(
    "bad", [float("nan"), float("inf"), 0, 301, 1.5, timedelta(milliseconds=500), True]
)
def test_create_wpt_refuses_bad_ttls_and_clocks(store: MemoryKeyStore, bad: Any) -> None:
    wit = mint(store)
    with pytest.raises(WptMintError):
        create_wpt(WL_JOSE, wit, ORIGIN + "/pay", ttl_seconds=bad)
    for clock in (float("nan"), float("inf"), True):
        with pytest.raises(WptMintError):
            create_wpt(WL_JOSE, wit, ORIGIN + "/pay", now=clock)


def test_verifier_from_bundle_file(store: MemoryKeyStore, tmp_path: Any) -> None:
    from custos.wimse.verifier import verifier_from_bundle_file

    jwks = {"keys": [{**store.public_jwk("issuer"), "kid": "issuer", "use": "wit-svid"}]}
    path = tmp_path / "bundle.json"
    TrustBundle.from_jwks(EXAMPLE, jwks).save(path)
    rp = verifier_from_bundle_file(path, "example.com", ORIGIN, now=NOW)
    wit = mint(store)
    caller = rp.verify(req(wit, hand_wpt(wit)))
    assert caller.subject == str(SUB_A) and caller.variant == "wpt"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0, 301, True])
def test_local_proof_signer_checks_lifetimes_at_construction(
    store: MemoryKeyStore, bad: Any
) -> None:
    from custos.wimse.signer import LocalProofSigner

    wit = mint(store)
    with pytest.raises(CustosError):
        LocalProofSigner(store.get("wl-store"), wit, wpt_ttl=bad)
    if bad not in (301,):
        with pytest.raises(CustosError):
            LocalProofSigner(store.get("wl-store"), wit, signature_ttl=bad)


def test_local_proof_signer_takes_timedeltas(store: MemoryKeyStore, bundles: BundleSet) -> None:
    from custos.wimse.signer import LocalProofSigner

    wit = mint_wit(
        store.get("issuer"),
        "ES256",
        "issuer",
        subject="wimse://example.com/svc/signer",
        workload_public_jwk=store.get("wl-store"),
        ttl=timedelta(hours=1),
    )
    signer = LocalProofSigner(
        store.get("wl-store"),
        wit,
        wpt_ttl=timedelta(seconds=20),
        signature_ttl=timedelta(seconds=30),
    )
    proof = signer.wpt(ORIGIN + "/pay")
    claims = json.loads(b64d(proof.wpt.split(".")[1]))
    assert claims["exp"] - int(claims.get("iat", claims["exp"] - 20)) == 20
    assert verifier(bundles, now=None, replay=MemoryReplayCache()).verify(
        req(proof.wit, proof.wpt)
    ).subject == WimseId.parse("wimse://example.com/svc/signer")
