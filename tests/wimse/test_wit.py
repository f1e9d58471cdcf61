"""Workload Identity Tokens: the drafts' example, minting, every verification
check, the attacks they stop, interop with PyJWT / jwcrypto, and the cache."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import jwcrypto.jwk
import jwcrypto.jwt
import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from custos.bundle import BundleSet, JwtAuthority, TrustBundle
from custos.errors import CustosError
from custos.identity import SpiffeId, TrustDomain, WimseId
from custos.integrations.problem import http_status
from custos.keys.jose import joserfc_key
from custos.keys.jwk import public_jwk_members
from custos.keys.software import MemoryKeyStore
from custos.wimse.errors import WimseError, WitError
from custos.wimse.wit import (
    WIT_ERROR_CODES,
    WitMintError,
    WitVerifier,
    mint_wit,
    parse_wit_unverified,
    token_hash,
    verify_wit,
)

# -- the drafts' vectors (../shared/vectors/wimse-vectors.txt, sections 1 and 4) ----------

NOW = 1745509000
DRAFT_WIT = (
    "eyJhbGciOiJFUzI1NiIsImtpZCI6Ikp1bmUgNSIsInR5cCI6IndpdCtqd3QifQ."
    "eyJjbmYiOnsiandrIjp7ImFsZyI6IkVkRFNBIiwiY3J2IjoiRWQyNTUxOSIsImt0eSI6Ik9LUCIsIngiOiIxQ1hY"
    "dmZsTl9MVlZzSXNZWHNVdkIwM0ptbEdXZUNIcVFWdW91Q0Y5MmJnIn19LCJleHAiOjE3NDU1MTI1MTAsImlhdCI6"
    "MTc0NTUwODkxMCwianRpIjoieC1fMUNUTDJjY2EzQ1NFNGN3Yl9sIiwic3ViIjoid2ltc2U6Ly9leGFtcGxlLmNv"
    "bS9zcGVjaWZpYy13b3JrbG9hZCJ9."
    "6KraSQUxWdl9dxFQ3Fj6dPY0Vi88OkwFwZpAIOhLeq6AbXAnLLQgOp8U9UDGcBuYF3KiNv6oKQD1ZWAzrMZOJw"
)
DRAFT_WTH = "AaYUfC34D1di2FxQLpiIJJ7Sg8VZ6o8OCdwSf9IToLg"
DRAFT_ISSUER_JWK = {
    "kty": "EC",
    "kid": "June 5",
    "crv": "P-256",
    "x": "kXqnA2Op7hgd4zRMbw0iFcc_hDxUxhojxOFVGjE2gks",
    "y": "n__VndPMR021-59UAs0b9qDTFT-EZtT6xSNs_xFskLo",
}
DRAFT_ISSUER_D = "NRHs9bfMUcF49AV_NIoeh3UGopW4AXZLfv5G2px1WcY"
DRAFT_WORKLOAD_X = "1CXXvflN_LVVsIsYXsUvB03JmlGWeCHqQVuouCF92bg"
SPIFFE_WIT_SVID = (
    "eyJhbGciOiJFUzI1NiIsImtpZCI6ImxRU2kzaFpGbmRhMkQtWEprajF6bDdmb0pvdWl3STRuckF5aHk0alppSmci"
    "LCJ0eXAiOiJ3aXQrand0In0."
    "eyJjbmYiOnsiandrIjp7ImFsZyI6IkVTMjU2IiwiY3J2IjoiUC0yNTYiLCJrdHkiOiJFQyIsIngiOiJyelA3bUxD"
    "S0FIV21zTTZYMEV3VklTQ19oSTN1amN1OTVmZlVreWVER0dvIiwieSI6InVPcmZEbGp0WDltM2pZLWhzeWhMSllh"
    "eHRHa3pEdjVlNWttQ2U1OFo5N2cifX0sImV4cCI6MTc2NTQ1NjUwMywiaWF0IjoxNzY1NDUyOTAzLCJqdGkiOiIx"
    "eWoxOVY0TWNPQXpNY0ZpN3F2c2dfQWdDeGxyWTVFX3g1MDl3bEtLUXRjIiwic3ViIjoic3BpZmZlOi8vZXhhbXBs"
    "ZS5jb20vbXktd29ya2xvYWQifQ."
    "sfhEvZNdY_kWrICF08lX0u__rn39YnTavnW-VPBS20zgowDh6-X43v5eOUKZbjZf06yLBQM-Mry5w1g1QFsCkg"
)
EXAMPLE = TrustDomain("example.com")
OTHER = TrustDomain("other.example")
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64d(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def draft_issuer_private() -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int.from_bytes(b64d(DRAFT_ISSUER_D), "big"), ec.SECP256R1())


def draft_bundles() -> BundleSet:
    return BundleSet([TrustBundle.from_jwks(EXAMPLE, {"keys": [DRAFT_ISSUER_JWK]})])


def hand_sign(header: dict[str, Any], claims: dict[str, Any], key: Any, alg: str) -> str:
    """A JWS built with cryptography (and hmac) only: independent of joserfc."""
    signing_input = (
        b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
    ).encode()
    if alg == "none":
        sig = b""
    elif alg.startswith("HS"):
        sig = hmac.new(key, signing_input, hashlib.sha256).digest()
    elif alg.startswith("ES"):
        hash_alg = {"ES256": hashes.SHA256(), "ES384": hashes.SHA384()}[alg]
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hash_alg)))
        size = (key.curve.key_size + 7) // 8
        sig = r.to_bytes(size, "big") + s.to_bytes(size, "big")
    elif alg == "EdDSA":
        sig = key.sign(signing_input)
    elif alg == "RS256":
        sig = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    elif alg == "PS256":
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        sig = key.sign(signing_input, pss, hashes.SHA256())
    else:
        raise AssertionError(alg)
    return signing_input.decode() + "." + b64(sig)


def draft_claims(**changes: Any) -> dict[str, Any]:
    claims: dict[str, Any] = json.loads(b64d(DRAFT_WIT.split(".")[1]))
    for name, value in changes.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def draft_header(**changes: Any) -> dict[str, Any]:
    header: dict[str, Any] = {"alg": "ES256", "kid": "June 5", "typ": "wit+jwt"}
    for name, value in changes.items():
        if value is None:
            header.pop(name, None)
        else:
            header[name] = value
    return header


def resign(header: dict[str, Any] | None = None, claims: dict[str, Any] | None = None) -> str:
    """A WIT signed with the drafts' issuer key after changing header / claims."""
    h = header if header is not None else draft_header()
    # always an ES256 signature, whatever alg the header claims
    return hand_sign(
        h, claims if claims is not None else draft_claims(), draft_issuer_private(), "ES256"
    )


def code_of(token: str, bundles: BundleSet | None = None, **kw: Any) -> str:
    with pytest.raises(WitError) as info:
        verify_wit(token, bundles or draft_bundles(), now=kw.pop("now", NOW), **kw)
    assert info.value.code in WIT_ERROR_CODES
    assert http_status(info.value) == 400
    return info.value.code


# -- the drafts' example ----------------------------------------------------------------


def test_draft_wit_verifies() -> None:
    wit = verify_wit(DRAFT_WIT, draft_bundles(), now=NOW)
    assert wit.subject == WimseId.parse("wimse://example.com/specific-workload")
    assert wit.trust_domain == EXAMPLE
    assert wit.cnf_alg == "EdDSA"
    assert wit.cnf_jwk["x"] == DRAFT_WORKLOAD_X
    assert wit.expires_at == 1745512510
    assert wit.kid == "June 5"
    # the wth the draft's WPT carries
    assert wit.token_hash == DRAFT_WTH == token_hash(DRAFT_WIT)
    assert isinstance(wit.cnf_public_key, ed25519.Ed25519PublicKey)


def test_resign_helper_reproduces_a_valid_token() -> None:
    # guards the mutation tests below: an unchanged re-signed token does verify
    assert verify_wit(resign(), draft_bundles(), now=NOW).subject == WimseId.parse(
        "wimse://example.com/specific-workload"
    )


def _flip(token: str, part: int, index: int) -> str:
    parts = token.split(".")
    chars = list(parts[part])
    chars[index] = B64URL[(B64URL.index(chars[index]) + 1) % 64]
    parts[part] = "".join(chars)
    return ".".join(parts)


def test_draft_wit_fails_when_any_byte_changes() -> None:
    """Every character position of header, claims and signature, each replaced
    by another base64url character (the replacement varies with the position)."""
    bundles = draft_bundles()
    seen: set[str] = set()
    positions = 0
    for i, ch in enumerate(DRAFT_WIT):
        if ch == ".":
            continue
        new = B64URL[(B64URL.index(ch) + 1 + i % 63) % 64]
        assert new != ch
        positions += 1
        seen.add(code_of(DRAFT_WIT[:i] + new + DRAFT_WIT[i + 1 :], bundles))
    assert positions == len(DRAFT_WIT) - 2
    # code_of checked each refusal is a WitError with a published code; the
    # shape checks (cnf, sub, typ...) run before the signature, so many show.
    assert "wit_bad_signature" in seen and seen <= WIT_ERROR_CODES
    # the unchanged token still verifies against the same bundles
    assert verify_wit(DRAFT_WIT, bundles, now=NOW).kid == "June 5"


#: RFC 8032 7.1 TEST 1 public key: a valid, full-order Ed25519 point.
RFC8032_PUB = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")


@pytest.mark.parametrize(
    "claims",
    [
        draft_claims(sub="wimse://example.com/other-workload"),
        draft_claims(exp=1745599999),
        draft_claims(iat=1745508911),
        draft_claims(jti="another"),
        draft_claims(iss="https://example.com"),
        draft_claims(
            cnf={"jwk": {"alg": "EdDSA", "crv": "Ed25519", "kty": "OKP", "x": b64(RFC8032_PUB)}}
        ),
    ],
    ids=["sub", "exp", "iat", "jti", "iss-added", "cnf"],
)
def test_draft_wit_fails_when_a_claim_changes(claims: dict[str, Any]) -> None:
    parts = DRAFT_WIT.split(".")
    forged = f"{parts[0]}.{b64(json.dumps(claims).encode())}.{parts[2]}"
    assert code_of(forged) == "wit_bad_signature"


@pytest.mark.parametrize(
    "header",
    [
        {"alg": "ES256", "kid": "June 5", "typ": "wit+jwt", "x": 1},
        {"alg": "ES256", "kid": "June 5", "typ": "application/wit+jwt"},
    ],
    ids=["extra-member", "typ-spelling"],
)
def test_draft_wit_fails_when_the_header_changes(header: dict[str, Any]) -> None:
    parts = DRAFT_WIT.split(".")
    forged = f"{b64(json.dumps(header).encode())}.{parts[1]}.{parts[2]}"
    assert code_of(forged) == "wit_bad_signature"


def test_spiffe_wit_svid_example_has_the_profile() -> None:
    # Its issuer key is not published: check the shape, and that it cannot verify.
    shape = parse_wit_unverified(SPIFFE_WIT_SVID, profile="spiffe")
    assert shape.subject == SpiffeId.parse("spiffe://example.com/my-workload")
    assert shape.alg == "ES256" and shape.cnf_alg == "ES256"
    assert shape.kid == "lQSi3hZFnda2D-XJkj1zl7foJouiwI4nrAyhy4jZiJg"
    assert "aud" not in shape.claims
    assert code_of(SPIFFE_WIT_SVID, now=1765453000, profile="spiffe") == "wit_unknown_kid"


def test_shape_carries_its_checked_dates() -> None:
    # The time checks read these instead of parsing the claims again.
    shape = parse_wit_unverified(DRAFT_WIT)
    claims = draft_claims()
    assert shape.exp == float(claims["exp"])
    assert shape.iat == (float(claims["iat"]) if "iat" in claims else None)
    assert shape.nbf == (float(claims["nbf"]) if "nbf" in claims else None)
    later = parse_wit_unverified(resign(claims=draft_claims(nbf=claims["exp"] - 10)))
    assert later.nbf == float(claims["exp"] - 10)


def test_remembered_subjects_never_let_a_refused_one_through() -> None:
    # The sub parse is remembered per string; refusals are not, so the same
    # bad sub is refused every time, before and after good ones are cached.
    bad = resign(claims=draft_claims(sub="wimse://example.com/a/../b"))
    assert code_of(bad) == "wit_bad_sub"
    first = verify_wit(DRAFT_WIT, draft_bundles(), now=NOW).subject
    assert code_of(bad) == "wit_bad_sub"
    assert verify_wit(DRAFT_WIT, draft_bundles(), now=NOW).subject == first


def test_draft_wit_is_not_a_wit_svid() -> None:
    # EdDSA cnf and a wimse:// subject: both outside the SPIFFE profile
    with pytest.raises(WitError) as info:
        parse_wit_unverified(DRAFT_WIT, profile="spiffe")
    assert info.value.code in {"wit_bad_cnf_alg", "wit_profile_violation"}


# -- minting ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def issuer_store() -> MemoryKeyStore:
    store = MemoryKeyStore()
    for alg in ("ES256", "ES384", "EdDSA", "RS256", "PS256"):
        store.create(f"issuer-{alg.lower()}", alg)
    store.create("workload", "ES256")
    store.create("workload-ed", "EdDSA")
    return store


def store_bundles(
    store: MemoryKeyStore, td: TrustDomain = EXAMPLE, use: str | None = "wit-svid"
) -> BundleSet:
    authorities = []
    for info in store.list():
        if info.name.startswith("issuer-"):
            authorities.append(JwtAuthority(info.name, store.public_key(info.name), use=use))  # type: ignore[arg-type]
    return BundleSet([TrustBundle(td, jwt_authorities=tuple(authorities))])


SUBJECT = WimseId.parse("wimse://example.com/svc/a")


@pytest.mark.parametrize("alg", ["ES256", "ES384", "EdDSA", "RS256", "PS256"])
def test_mint_through_memory_keystore_roundtrips(issuer_store: MemoryKeyStore, alg: str) -> None:
    name = f"issuer-{alg.lower()}"
    token = mint_wit(
        joserfc_key(issuer_store.get(name)),
        alg,
        name,
        SUBJECT,
        issuer_store.public_jwk("workload"),
        timedelta(hours=1),
        issuer="https://issuer.example.com",
        now=NOW,
    )
    header = json.loads(b64d(token.split(".")[0]))
    assert header == {"alg": alg, "kid": name, "typ": "wit+jwt"}
    wit = verify_wit(token, store_bundles(issuer_store), now=NOW + 10)
    assert wit.subject == SUBJECT
    assert wit.claims["iss"] == "https://issuer.example.com"
    assert wit.claims["iat"] == NOW and wit.claims["exp"] == NOW + 3600
    assert len(b64d(wit.claims["jti"])) == 16
    # cnf.jwk: public members and alg only (the store's kid is left out)
    assert dict(wit.cnf_jwk) == {
        **public_jwk_members(issuer_store.public_key("workload")),
        "alg": "ES256",
    }


def test_mint_without_issuer_has_no_iss_and_fresh_jti(issuer_store: MemoryKeyStore) -> None:
    key = joserfc_key(issuer_store.get("issuer-es256"))
    jwk = issuer_store.public_jwk("workload")
    a = mint_wit(key, "ES256", "issuer-es256", SUBJECT, jwk, timedelta(minutes=5), now=NOW)
    b = mint_wit(key, "ES256", "issuer-es256", SUBJECT, jwk, timedelta(minutes=5), now=NOW)
    ca, cb = (parse_wit_unverified(t).claims for t in (a, b))
    assert "iss" not in ca and ca["jti"] != cb["jti"]


def test_mint_spiffe_profile(issuer_store: MemoryKeyStore) -> None:
    spiffe_subject = SpiffeId.parse("spiffe://example.com/my-workload")
    token = mint_wit(
        joserfc_key(issuer_store.get("issuer-es256")),
        "ES256",
        "issuer-es256",
        spiffe_subject,
        issuer_store.public_jwk("workload"),
        timedelta(hours=1),
        profile="spiffe",
        now=NOW,
    )
    wit = verify_wit(token, store_bundles(issuer_store), now=NOW, profile="spiffe")
    assert wit.subject == spiffe_subject and wit.claims["nbf"] == NOW
    assert "aud" not in wit.claims


@pytest.mark.parametrize(
    ("alg", "workload", "subject", "extra", "issuer"),
    [
        ("EdDSA", "workload", "spiffe://example.com/w", None, None),  # no EdDSA signing
        ("ES256", "workload-ed", "spiffe://example.com/w", None, None),  # no EdDSA cnf
        ("ES256", "workload", "wimse://example.com/w", None, None),  # sub must be spiffe://
        ("ES256", "workload", "spiffe://example.com/w", {"aud": "x"}, None),  # no aud
        ("ES256", "workload", "spiffe://example.com/w", None, "https://oidc.example"),
    ],
    ids=["eddsa-signing", "eddsa-cnf", "wimse-sub", "aud", "oidc-iss"],
)
def test_mint_spiffe_profile_refuses(
    issuer_store: MemoryKeyStore,
    alg: str,
    workload: str,
    subject: str,
    extra: dict[str, Any] | None,
    issuer: str | None,
) -> None:
    name = f"issuer-{alg.lower()}"
    from custos.identity import parse_workload_id

    with pytest.raises(WitMintError):
        mint_wit(
            joserfc_key(issuer_store.get(name)),
            alg,
            name,
            parse_workload_id(subject),
            issuer_store.public_jwk(workload),
            timedelta(hours=1),
            profile="spiffe",
            extra_claims=extra,
            issuer=issuer,
            now=NOW,
        )


@pytest.mark.parametrize(
    "jwk_change",
    [
        {"d": "AAAA"},  # a private key
        {"alg": None},  # no alg
        {"alg": "HS256"},
        {"alg": "ES384"},  # does not fit a P-256 key
    ],
    ids=["private", "no-alg", "hmac-alg", "alg-key-mismatch"],
)
def test_mint_refuses_bad_workload_jwk(
    issuer_store: MemoryKeyStore, jwk_change: dict[str, Any]
) -> None:
    jwk = dict(issuer_store.public_jwk("workload"))
    for k, v in jwk_change.items():
        if v is None:
            jwk.pop(k)
        else:
            jwk[k] = v
    with pytest.raises(WitMintError):
        mint_wit(
            joserfc_key(issuer_store.get("issuer-es256")),
            "ES256",
            "issuer-es256",
            SUBJECT,
            jwk,
            timedelta(hours=1),
            now=NOW,
        )


def test_mint_refuses_reserved_extra_claims_and_bad_ttl(issuer_store: MemoryKeyStore) -> None:
    key = joserfc_key(issuer_store.get("issuer-es256"))
    jwk = issuer_store.public_jwk("workload")
    with pytest.raises(WitMintError):
        mint_wit(key, "ES256", "k", SUBJECT, jwk, timedelta(hours=1), extra_claims={"sub": "x"})
    with pytest.raises(WitMintError):
        mint_wit(key, "ES256", "k", SUBJECT, jwk, timedelta(0))
    with pytest.raises(WitMintError):
        mint_wit(key, "HS256", "k", SUBJECT, jwk, timedelta(hours=1))
    with pytest.raises(WitMintError):
        mint_wit(key, "ES384", "k", SUBJECT, jwk, timedelta(hours=1))  # key is P-256


# -- every verification check, by name ---------------------------------------------------


def test_check_structure_parts() -> None:
    a, b, c = DRAFT_WIT.split(".")
    assert code_of(f"{a}.{b}") == "wit_malformed"
    assert code_of(f"{a}.{b}.{c}.{c}") == "wit_malformed"
    assert code_of("") == "wit_malformed"
    assert code_of(f"{a}.{b}.{c}=") == "wit_malformed"  # padding is not base64url


def test_check_size_limit() -> None:
    big = resign(claims=draft_claims(pad="x" * 9000))
    assert code_of(big) == "wit_too_large"


def test_check_non_canonical_base64() -> None:
    a, b, c = DRAFT_WIT.split(".")
    # "w" -> "x" changes only the unused low bits of the last signature char
    last = c[-1]
    twin = B64URL[B64URL.index(last) ^ 1]
    assert b64d(c[:-1] + twin) == b64d(c)
    assert code_of(f"{a}.{b}.{c[:-1]}{twin}") == "wit_malformed"


def test_check_duplicate_json_members() -> None:
    h = '{"alg":"ES256","kid":"June 5","typ":"wit+jwt","typ":"wit+jwt"}'
    token = b64(h.encode()) + "." + ".".join(DRAFT_WIT.split(".")[1:])
    assert code_of(token) == "wit_malformed"


def test_check_crit_header() -> None:
    assert code_of(resign(draft_header(crit=["exp"]))) == "wit_malformed"


@pytest.mark.parametrize("typ", [None, "JWT", "jwt", "wpt+jwt", "wit+jwt ", "application/jwt"])
def test_check_typ(typ: str | None) -> None:
    assert code_of(resign(draft_header(typ=typ))) == "wit_bad_typ"


@pytest.mark.parametrize("typ", ["wit+jwt", "application/wit+jwt", "WIT+JWT"])
def test_typ_spellings_accepted(typ: str) -> None:
    assert verify_wit(resign(draft_header(typ=typ)), draft_bundles(), now=NOW).kid == "June 5"


def test_attack_alg_none() -> None:
    token = hand_sign(draft_header(alg="none"), draft_claims(), None, "none")
    assert token.endswith(".")
    assert code_of(token) == "wit_bad_alg"
    assert code_of(token + "c2ln") == "wit_bad_alg"
    for spelling in ("None", "NONE", "nOnE"):
        assert (
            code_of(hand_sign(draft_header(alg=spelling), draft_claims(), None, "none"))
            == "wit_bad_alg"
        )


def test_attack_hs256_keyed_with_the_public_key() -> None:
    # The classic confusion: HMAC keyed with the issuer's public key (PEM and JWK forms)
    public = draft_issuer_private().public_key()
    for secret in (
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        json.dumps(DRAFT_ISSUER_JWK).encode(),
    ):
        token = hand_sign(draft_header(alg="HS256"), draft_claims(), secret, "HS256")
        assert code_of(token) == "wit_bad_alg"


def test_alg_outside_allowlist() -> None:
    assert code_of(resign(draft_header(alg="ES256K"))) == "wit_bad_alg"
    assert code_of(DRAFT_WIT, algorithms={"EdDSA"}) == "wit_bad_alg"


def test_check_kid_present() -> None:
    assert code_of(resign(draft_header(kid=None))) == "wit_missing_kid"
    assert code_of(resign(draft_header(kid=""))) == "wit_missing_kid"


def test_attack_kid_not_found() -> None:
    assert code_of(resign(draft_header(kid="June 6"))) == "wit_unknown_kid"


def test_check_sub() -> None:
    assert code_of(resign(claims=draft_claims(sub=None))) == "wit_bad_sub"
    assert code_of(resign(claims=draft_claims(sub="https://example.com/x"))) == "wit_bad_sub"
    assert code_of(resign(claims=draft_claims(sub="wimse://example.com/a/../b"))) == "wit_bad_sub"
    assert code_of(resign(claims=draft_claims(sub=["wimse://example.com/x"]))) == "wit_bad_sub"


def test_unknown_trust_domain() -> None:
    token = resign(claims=draft_claims(sub="wimse://other.example/x"))
    assert code_of(token) == "wit_unknown_trust_domain"


def test_attack_wit_signed_by_another_trust_domains_key() -> None:
    # other.example's issuer mints a WIT for a workload of example.com: keys come
    # only from example.com's bundle, whatever kid or iss the token names.
    evil = ec.generate_private_key(ec.SECP256R1())
    bundles = draft_bundles()
    bundles.add(TrustBundle(OTHER, jwt_authorities=(JwtAuthority("evil-1", evil.public_key()),)))
    claims = draft_claims(iss="https://other.example")
    token = hand_sign(draft_header(kid="evil-1"), claims, evil, "ES256")
    assert code_of(token, bundles) == "wit_unknown_kid"
    # reusing example.com's kid does not help either
    token = hand_sign(draft_header(), claims, evil, "ES256")
    assert code_of(token, bundles) == "wit_bad_signature"
    # and the same token is fine for other.example's own workloads
    own = hand_sign(
        draft_header(kid="evil-1"), draft_claims(sub="wimse://other.example/x"), evil, "ES256"
    )
    assert verify_wit(own, bundles, now=NOW).trust_domain == OTHER


def test_iss_is_never_used_to_find_keys() -> None:
    token = resign(claims=draft_claims(iss="https://attacker.example/jwks"))
    assert (
        verify_wit(token, draft_bundles(), now=NOW).claims["iss"] == "https://attacker.example/jwks"
    )


@pytest.mark.parametrize("use", ["jwt-svid", "x509-svid", "sig"])
def test_attack_key_with_another_use_is_refused(use: str) -> None:
    key = draft_issuer_private().public_key()
    bundles = BundleSet(
        [TrustBundle(EXAMPLE, jwt_authorities=(JwtAuthority("June 5", key, use=use),))]
    )
    assert code_of(DRAFT_WIT, bundles) == "wit_key_wrong_use"


def test_jwks_use_jwt_svid_refused_but_wit_svid_and_absent_accepted() -> None:
    for use, ok in (("jwt-svid", False), ("wit-svid", True), (None, True)):
        jwk = dict(DRAFT_ISSUER_JWK)
        if use:
            jwk["use"] = use
        bundles = BundleSet([TrustBundle.from_jwks(EXAMPLE, {"keys": [jwk]})])
        if ok:
            assert verify_wit(DRAFT_WIT, bundles, now=NOW).kid == "June 5"
        else:
            assert code_of(DRAFT_WIT, bundles) == "wit_key_wrong_use"


def test_spiffe_profile_needs_use_wit_svid() -> None:
    assert code_of(DRAFT_WIT, profile="spiffe") in {"wit_bad_cnf_alg", "wit_profile_violation"}
    evil = ec.generate_private_key(ec.SECP256R1())
    cnf = {"jwk": {**public_jwk_members(evil.public_key()), "alg": "ES256"}}
    claims = draft_claims(sub="spiffe://example.com/w", cnf=cnf)
    token = resign(claims=claims)
    # The draft's key has no use: read from a SPIFFE bundle such an
    # entry is ignored (spec 4.2.2), so the WIT-SVID names an unknown key.
    key_only = draft_bundles().get(EXAMPLE).jwt_authorities[0].jwk()
    spiffe = BundleSet([TrustBundle.from_spiffe_json(EXAMPLE, {"keys": [key_only]})])
    assert code_of(token, spiffe, profile="spiffe") == "wit_unknown_kid"
    assert (
        code_of(resign(claims={**claims, "aud": "x"}), profile="spiffe") == "wit_profile_violation"
    )


def test_key_alg_and_type_must_fit() -> None:
    key = draft_issuer_private().public_key()
    bundles = BundleSet(
        [TrustBundle(EXAMPLE, jwt_authorities=(JwtAuthority("June 5", key, alg="ES384"),))]
    )
    assert code_of(DRAFT_WIT, bundles) == "wit_key_alg_mismatch"
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    bundles = BundleSet([TrustBundle(EXAMPLE, jwt_authorities=(JwtAuthority("June 5", rsa_key),))])
    assert code_of(DRAFT_WIT, bundles) == "wit_key_alg_mismatch"


def test_check_signature() -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    assert code_of(hand_sign(draft_header(), draft_claims(), other, "ES256")) == "wit_bad_signature"


def test_check_exp() -> None:
    assert code_of(resign(claims=draft_claims(exp=None))) == "wit_missing_exp"
    assert code_of(resign(claims=draft_claims(exp="1745512510"))) == "wit_malformed"
    assert code_of(resign(claims=draft_claims(exp=True))) == "wit_malformed"
    assert code_of(DRAFT_WIT, now=1745512510 + 60) == "wit_expired"
    assert code_of(DRAFT_WIT, now=1745512510 + 5, leeway=0) == "wit_expired"
    # within the leeway it still verifies
    assert verify_wit(DRAFT_WIT, draft_bundles(), now=1745512510 + 30).kid == "June 5"


def test_check_exp_must_be_finite() -> None:
    raw = json.dumps(draft_claims()).replace('"exp": 1745512510', '"exp": 1e999')
    assert "1e999" in raw
    header = b64(json.dumps(draft_header()).encode())
    signing_input = f"{header}.{b64(raw.encode())}".encode()
    r, s = decode_dss_signature(
        draft_issuer_private().sign(signing_input, ec.ECDSA(hashes.SHA256()))
    )
    token = signing_input.decode() + "." + b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
    assert code_of(token) == "wit_malformed"


def test_check_iat_and_nbf_not_in_future() -> None:
    assert code_of(resign(claims=draft_claims(iat=NOW + 3600))) == "wit_iat_in_future"
    assert code_of(resign(claims=draft_claims(nbf=NOW + 3600))) == "wit_not_yet_valid"
    assert verify_wit(resign(claims=draft_claims(iat=NOW + 30)), draft_bundles(), now=NOW)


def test_attack_missing_cnf() -> None:
    assert code_of(resign(claims=draft_claims(cnf=None))) == "wit_bad_cnf"
    assert code_of(resign(claims=draft_claims(cnf={}))) == "wit_bad_cnf"
    assert code_of(resign(claims=draft_claims(cnf={"jwk": "x"}))) == "wit_bad_cnf"
    assert code_of(resign(claims=draft_claims(cnf={"jkt": "abc"}))) == "wit_bad_cnf"


def _cnf(**changes: Any) -> dict[str, Any]:
    jwk: dict[str, Any] = {"alg": "EdDSA", "crv": "Ed25519", "kty": "OKP", "x": DRAFT_WORKLOAD_X}
    for k, v in changes.items():
        if v is None:
            jwk.pop(k)
        else:
            jwk[k] = v
    return {"jwk": jwk}


def test_check_cnf_public_only_with_alg() -> None:
    assert code_of(resign(claims=draft_claims(cnf=_cnf(alg=None)))) == "wit_bad_cnf_alg"
    assert (
        code_of(
            resign(claims=draft_claims(cnf=_cnf(d="sdLX8yCYKqo_XvGBLn-ZWeKT7llYeeQpgeCaXVxb5kY")))
        )
        == "wit_private_cnf"
    )
    assert (
        code_of(
            resign(
                claims=draft_claims(cnf={"jwk": {"kty": "oct", "k": "c2VjcmV0", "alg": "HS256"}})
            )
        )
        == "wit_private_cnf"
    )
    assert code_of(resign(claims=draft_claims(cnf=_cnf(kty="oct")))) == "wit_bad_cnf"
    assert code_of(resign(claims=draft_claims(cnf=_cnf(x="AAAA")))) == "wit_bad_cnf"


@pytest.mark.parametrize("alg", ["none", "HS256", "RSA-OAEP", "ES256", "ES256K"])
def test_check_cnf_alg_asymmetric_and_fitting(alg: str) -> None:
    assert code_of(resign(claims=draft_claims(cnf=_cnf(alg=alg)))) == "wit_bad_cnf_alg"


def test_extra_claims_are_ignored() -> None:
    token = resign(claims=draft_claims(**{"example.com/myclaim": {"a": 1}}))
    assert verify_wit(token, draft_bundles(), now=NOW).claims["example.com/myclaim"] == {"a": 1}


def test_errors_never_contain_the_token() -> None:
    bad = [
        _flip(DRAFT_WIT, 2, 5),
        resign(draft_header(typ="JWT")),
        resign(claims=draft_claims(exp=1)),
    ]
    for token in bad:
        with pytest.raises(WitError) as info:
            verify_wit(token, draft_bundles(), now=NOW)
        text = str(info.value) + repr(info.value) + str(info.value.__cause__)
        for part in token.split("."):
            assert part not in text


# -- interop ------------------------------------------------------------------------------


def test_our_wit_verifies_with_pyjwt_and_jwcrypto(issuer_store: MemoryKeyStore) -> None:
    token = mint_wit(
        joserfc_key(issuer_store.get("issuer-es256")),
        "ES256",
        "issuer-es256",
        SUBJECT,
        issuer_store.public_jwk("workload"),
        timedelta(hours=1),
    )
    public = issuer_store.public_key("issuer-es256")
    claims = pyjwt.decode(token, public, algorithms=["ES256"])  # type: ignore[arg-type]
    assert claims["sub"] == str(SUBJECT)
    assert pyjwt.get_unverified_header(token)["typ"] == "wit+jwt"
    key = jwcrypto.jwk.JWK(**public_jwk_members(public))  # type: ignore[arg-type]
    checked = jwcrypto.jwt.JWT(jwt=token, key=key, algs=["ES256"])
    assert json.loads(checked.claims)["cnf"]["jwk"]["alg"] == "ES256"


@pytest.mark.parametrize("alg", ["ES256", "EdDSA", "RS256", "PS256"])
def test_independently_made_wit_verifies_with_ours(alg: str) -> None:
    private: Any = {
        "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
        "EdDSA": ed25519.Ed25519PrivateKey.generate,
        "RS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "PS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    }[alg]()
    workload = ec.generate_private_key(ec.SECP256R1())
    claims = {
        "sub": "spiffe://example.com/ns/x",
        "exp": NOW + 600,
        "iat": NOW,
        "jti": "j1",
        "cnf": {"jwk": {**public_jwk_members(workload.public_key()), "alg": "ES256"}},
    }
    token = hand_sign({"alg": alg, "kid": "k1", "typ": "wit+jwt"}, claims, private, alg)
    bundles = BundleSet(
        [TrustBundle(EXAMPLE, jwt_authorities=(JwtAuthority("k1", private.public_key()),))]
    )
    wit = verify_wit(token, bundles, now=NOW)
    assert str(wit.subject) == "spiffe://example.com/ns/x" and wit.cnf_alg == "ES256"


# -- the cache ----------------------------------------------------------------------------


def test_wit_verifier_caches_until_exp() -> None:
    clock = [float(NOW)]
    verifier = WitVerifier(draft_bundles(), now=lambda: clock[0])
    first = verifier.verify(DRAFT_WIT)
    assert verifier.verify(DRAFT_WIT) is first and len(verifier) == 1
    clock[0] = 1745512510 + 61  # past exp + leeway: the cached entry is not used
    with pytest.raises(WitError) as info:
        verifier.verify(DRAFT_WIT)
    assert info.value.code == "wit_expired" and len(verifier) == 0


def test_wit_verifier_cache_follows_bundle_rotation() -> None:
    bundles = draft_bundles()
    verifier = WitVerifier(bundles, now=NOW)
    verifier.verify(DRAFT_WIT)
    # the key is removed from the trust domain: the cached WIT must not survive
    bundles.add(TrustBundle(EXAMPLE))
    with pytest.raises(WitError) as info:
        verifier.verify(DRAFT_WIT)
    assert info.value.code == "wit_unknown_kid"


def test_wit_verifier_cache_is_bounded_and_skips_failures() -> None:
    verifier = WitVerifier(draft_bundles(), now=NOW, max_entries=2)
    for jti in ("a", "b", "c"):
        verifier.verify(resign(claims=draft_claims(jti=jti)))
    assert len(verifier) == 2
    with pytest.raises(WitError):
        verifier.verify(_flip(DRAFT_WIT, 2, 3))
    assert len(verifier) == 2


# -- property: parsers fail only with WimseError, never accept garbage --------------------

_segments = st.one_of(
    st.text(alphabet=B64URL, max_size=60),
    st.dictionaries(
        st.sampled_from(["alg", "typ", "kid", "sub", "exp", "cnf", "crit"]),
        st.one_of(
            st.none(), st.integers(), st.text(max_size=10), st.lists(st.integers(), max_size=2)
        ),
        max_size=5,
    ).map(lambda d: b64(json.dumps(d).encode())),
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.one_of(st.text(max_size=200), st.lists(_segments, min_size=1, max_size=4).map(".".join)))
def test_property_wit_parser_only_raises_wimse_errors(token: str) -> None:
    with pytest.raises(WimseError):
        verify_wit(token, draft_bundles(), now=NOW)
    with pytest.raises(WimseError):
        parse_wit_unverified(token)


# -- review findings: hostile cnf keys are refused with a code, never a crash -----

_jwk_members = st.dictionaries(
    st.sampled_from(["kty", "crv", "x", "y", "n", "e", "alg", "d", "use"]),
    st.one_of(
        st.sampled_from(
            [
                "OKP",
                "EC",
                "RSA",
                "oct",
                "Ed25519",
                "Ed448",
                "P-256",
                "P-999",
                "foo",
                "ES256",
                "EdDSA",
                "AQAB",
                "1CXXvflN_LVVsIsYXsUvB03JmlGWeCHqQVuouCF92bg",
            ]
        ),
        st.text(max_size=8),
        st.integers(),
        st.none(),
        st.lists(st.text(max_size=3), max_size=2),
    ),
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(cnf=st.one_of(st.fixed_dictionaries({"jwk": _jwk_members}), _jwk_members, st.text()))
def test_property_hostile_cnf_only_raises_wimse_errors(cnf: object) -> None:
    import base64
    import json

    from custos.wimse.errors import WimseError
    from custos.wimse.wit import parse_wit_unverified

    def b64(obj: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    header = {"alg": "ES256", "kid": "k", "typ": "wit+jwt"}
    claims = {"sub": "wimse://example.com/w", "exp": 2_000_000_000, "iat": 1, "cnf": cnf}
    token = f"{b64(header)}.{b64(claims)}.{'A' * 86}"
    try:
        parse_wit_unverified(token)
    except WimseError:
        pass


def test_okp_cnf_with_a_non_edwards_curve_is_bad_cnf() -> None:
    import base64
    import json

    from custos.wimse.errors import WitError
    from custos.wimse.wit import parse_wit_unverified

    def b64(obj: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    cnf = {
        "jwk": {
            "kty": "OKP",
            "crv": "P-256",
            "x": "1CXXvflN_LVVsIsYXsUvB03JmlGWeCHqQVuouCF92bg",
            "alg": "EdDSA",
        }
    }
    claims = {"sub": "wimse://example.com/w", "exp": 2_000_000_000, "iat": 1, "cnf": cnf}
    token = f"{b64({'alg': 'ES256', 'kid': 'k', 'typ': 'wit+jwt'})}.{b64(claims)}.{'A' * 86}"
    with pytest.raises(WitError) as exc:
        parse_wit_unverified(token)
    assert exc.value.code == "wit_bad_cnf"


def test_mint_refuses_sub_second_ttl(issuer_store: MemoryKeyStore) -> None:
    # int(0.5 s) would give exp == iat: a token dead on arrival.
    with pytest.raises(WitMintError, match="at least one second"):
        mint_wit(
            joserfc_key(issuer_store.get("issuer-es256")),
            "ES256",
            "issuer-es256",
            SUBJECT,
            issuer_store.public_jwk("workload"),
            timedelta(milliseconds=500),
            now=NOW,
        )


def test_request_verifier_can_hold_wits_to_the_spiffe_profile(
    issuer_store: MemoryKeyStore,
) -> None:
    from custos.wimse.http.message import HttpMessage
    from custos.wimse.verifier import build_request_verifier

    wimse_subject = WimseId.parse("wimse://example.com/w")
    token = mint_wit(
        joserfc_key(issuer_store.get("issuer-es256")),
        "ES256",
        "issuer-es256",
        wimse_subject,
        issuer_store.public_jwk("workload"),
        timedelta(hours=1),
        now=NOW,
    )
    request = HttpMessage.request(
        "GET", "/x", [("Workload-Identity-Token", token), ("Authorization", "WPT e30.e30.c2ln")]
    )
    bundles = store_bundles(issuer_store)
    # WIMSE profile: the WIT passes, the (junk) proof is what fails.
    with pytest.raises(WimseError) as wimse_info:
        build_request_verifier(bundles, ["https://rp.example"], now=NOW).verify(request)
    assert wimse_info.value.code.startswith("wpt_")
    # SPIFFE profile: a wimse:// subject is refused at the WIT, before the proof.
    with pytest.raises(WitError) as spiffe_info:
        build_request_verifier(
            bundles, ["https://rp.example"], now=NOW, wit_profile="spiffe"
        ).verify(request)
    assert spiffe_info.value.code in {"wit_profile_violation", "wit_bad_sub"}


@pytest.mark.parametrize("claim", ["exp", "iat", "nbf"])
def test_huge_integer_dates_are_malformed_not_a_crash(claim: str) -> None:
    # Signed by the trusted issuer, but a date no float can hold: wit_malformed,
    # never an OverflowError.
    assert code_of(resign(claims={**draft_claims(), claim: 10**400})) == "wit_malformed"


# -- issue 7: weak confirmation keys (item 7) ------------------------------------------------

#: 2^255 - 19, the field prime of Curve25519.
ED25519_P = 2**255 - 19


def _p256_with_short_x() -> ec.EllipticCurvePublicKey:
    """A P-256 key whose x coordinate has a leading zero octet (1 key in 256)."""
    while True:
        key = ec.generate_private_key(ec.SECP256R1()).public_key()
        if key.public_numbers().x < 2**248:
            return key


def _weak_cnfs() -> dict[str, dict[str, Any]]:
    short = _p256_with_short_x().public_numbers()
    good = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()
    n = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    rsa_n = n.public_numbers().n.to_bytes(256, "big")
    return {
        # the identity point: [S]B == R + [k]A holds for S = 0, R = identity, any message
        "ed25519-small-order": {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": b64(bytes([1]) + bytes(31)),
            "alg": "EdDSA",
        },
        # y = p + 1 is y = 1 spelled a second way (y >= p: not canonical)
        "ed25519-non-canonical": {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": b64((ED25519_P + 1).to_bytes(32, "little")),
            "alg": "EdDSA",
        },
        # RFC 7518 6.2.1.2: x and y are exactly 32 octets for P-256, leading zeros kept
        "ec-x-leading-zero-stripped": {
            "kty": "EC",
            "crv": "P-256",
            "x": b64(short.x.to_bytes(31, "big")),
            "y": b64(short.y.to_bytes(32, "big")),
            "alg": "ES256",
        },
        "ec-x-extra-leading-zero": {
            "kty": "EC",
            "crv": "P-256",
            "x": b64(b"\x00" + good.x.to_bytes(32, "big")),
            "y": b64(good.y.to_bytes(32, "big")),
            "alg": "ES256",
        },
        # RFC 7518 6.3.1.1: n is the minimal octet string, no leading zero octet
        "rsa-n-leading-zero": {
            "kty": "RSA",
            "n": b64(b"\x00" + rsa_n),
            "e": "AQAB",
            "alg": "RS256",
        },
    }


WEAK_CNFS = _weak_cnfs()


@pytest.mark.parametrize("name", sorted(WEAK_CNFS))
def test_attack_mint_refuses_weak_cnf_keys(issuer_store: MemoryKeyStore, name: str) -> None:
    with pytest.raises(WitMintError) as info:
        mint_wit(
            issuer_store.get("issuer-es256"),
            subject=SUBJECT,
            workload_public_jwk=WEAK_CNFS[name],
            ttl=timedelta(hours=1),
        )
    assert info.value.code == "wit_mint_bad_key"


@pytest.mark.parametrize("name", sorted(WEAK_CNFS))
def test_attack_verifier_refuses_wits_binding_weak_keys(name: str) -> None:
    # Signed by the trusted issuer: only the bound key is wrong.
    token = resign(claims=draft_claims(cnf={"jwk": WEAK_CNFS[name]}))
    assert code_of(token) == "wit_weak_cnf"
    with pytest.raises(WitError) as info:
        parse_wit_unverified(token)
    assert info.value.code == "wit_weak_cnf"


def test_the_small_order_key_really_verifies_a_keyless_signature() -> None:
    # Why the refusal matters: with this cnf key anyone "proves possession".
    key = ed25519.Ed25519PublicKey.from_public_bytes(bytes([1]) + bytes(31))
    key.verify(bytes([1]) + bytes(31) + bytes(32), b"any proof at all")


# -- issue 7: non-finite numbers (item 11) ----------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_mint_refuses_non_finite_ttl_and_now(issuer_store: MemoryKeyStore, bad: float) -> None:
    key = issuer_store.get("issuer-es256")
    jwk = issuer_store.public_jwk("workload")
    with pytest.raises(WitMintError):
        mint_wit(key, subject=SUBJECT, workload_public_jwk=jwk, ttl=bad)
    with pytest.raises(WitMintError):
        mint_wit(key, subject=SUBJECT, workload_public_jwk=jwk, ttl=60, now=bad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), True])
def test_wit_verifiers_refuse_non_finite_clock_and_leeway(bad: Any) -> None:
    bundles = draft_bundles()
    with pytest.raises(CustosError):
        WitVerifier(bundles, now=bad)
    with pytest.raises(CustosError):
        WitVerifier(bundles, leeway=bad)
    with pytest.raises(CustosError):
        verify_wit(DRAFT_WIT, bundles, now=bad)
    with pytest.raises(CustosError):
        verify_wit(DRAFT_WIT, bundles, now=NOW, leeway=bad)


def test_a_clock_that_answers_nan_is_refused_not_believed() -> None:
    # NaN compares false with every exp: the token would never expire.
    verifier = WitVerifier(draft_bundles(), now=lambda: float("nan"), max_entries=0)
    with pytest.raises(CustosError):
        verifier.verify(DRAFT_WIT)


def test_leeway_as_timedelta() -> None:
    verifier = WitVerifier(draft_bundles(), now=1745512510 + 30, leeway=timedelta(minutes=1))
    assert verifier.leeway == 60 and verifier.verify(DRAFT_WIT).kid == "June 5"


# -- issue 7: bare trust-domain subjects (item 13) ------------------------------------------


def test_attack_bare_trust_domain_sub_is_neither_minted_nor_accepted(
    issuer_store: MemoryKeyStore,
) -> None:
    for subject in (SpiffeId.parse("spiffe://example.com"), "spiffe://example.com"):
        with pytest.raises(WitMintError):
            mint_wit(
                issuer_store.get("issuer-es256"),
                subject=subject,
                workload_public_jwk=issuer_store.public_jwk("workload"),
                ttl=timedelta(hours=1),
            )
    token = resign(claims=draft_claims(sub="spiffe://example.com"))
    assert code_of(token) == "wit_bad_sub"


# -- issue 7: what a new user has (keys, strings, timedelta) ---------------------------------


def test_mint_takes_alg_and_kid_from_the_store_key(issuer_store: MemoryKeyStore) -> None:
    # A StoreKey, not joserfc_key(...); alg and kid from its JWK; a string subject;
    # the workload's own StoreKey; a TTL in seconds.
    token = mint_wit(
        issuer_store.get("issuer-es384"),
        subject="wimse://example.com/svc/a",
        workload_public_jwk=issuer_store.get("workload"),
        ttl=600,
        now=NOW,
    )
    header = json.loads(b64d(token.split(".")[0]))
    assert header == {
        "alg": "ES384",
        "kid": issuer_store.public_jwk("issuer-es384")["kid"],
        "typ": "wit+jwt",
    }
    jwks = {"keys": [{**issuer_store.public_jwk("issuer-es384"), "use": "wit-svid"}]}
    wit = verify_wit(token, BundleSet([TrustBundle.from_jwks(EXAMPLE, jwks)]), now=NOW)
    assert wit.subject == SUBJECT and wit.expires_at == NOW + 600


def test_mint_names_what_is_missing(issuer_store: MemoryKeyStore) -> None:
    from joserfc.jwk import ECKey

    bare = ECKey.generate_key("P-256")  # no kid, no alg in its JWK
    with pytest.raises(WitMintError, match="alg="):
        mint_wit(bare, subject=SUBJECT, workload_public_jwk={}, ttl=60)
    with pytest.raises(WitMintError, match="kid="):
        mint_wit(bare, "ES256", subject=SUBJECT, workload_public_jwk={}, ttl=60)
    with pytest.raises(WitMintError, match="subject"):
        mint_wit(issuer_store.get("issuer-es256"), ttl=60)
    with pytest.raises(WitMintError, match="workload identifier"):
        mint_wit(
            issuer_store.get("issuer-es256"),
            subject="https://not.an.id/x",
            workload_public_jwk=issuer_store.public_jwk("workload"),
            ttl=60,
        )


# -- SPIFFE WIT-SVID profile, line by line (spiffe/spiffe standards/WIT-SVID.md) -----------


def _svid_claims(**changes: Any) -> dict[str, Any]:
    workload = ec.generate_private_key(ec.SECP256R1()).public_key()
    cnf = {"jwk": {**public_jwk_members(workload), "alg": "ES256"}}
    return draft_claims(**{"sub": "spiffe://example.com/w", "cnf": cnf, **changes})


def _svid_bundles(use: str | None = "wit-svid") -> BundleSet:
    key = draft_issuer_private().public_key()
    return BundleSet(
        [TrustBundle(EXAMPLE, jwt_authorities=(JwtAuthority("June 5", key, use=use),))]
    )


def test_wit_svid_2_1_kid_must_be_present() -> None:
    token = resign(header=draft_header(kid=None), claims=_svid_claims())
    assert code_of(token, _svid_bundles(), profile="spiffe") == "wit_missing_kid"
    with pytest.raises(WitMintError):
        mint_wit(
            draft_issuer_key_jose(),
            "ES256",
            "",
            SpiffeId.parse("spiffe://example.com/w"),
            _svid_claims()["cnf"]["jwk"],
            timedelta(hours=1),
            profile="spiffe",
        )


def draft_issuer_key_jose() -> Any:
    from joserfc.jwk import ECKey

    return ECKey.import_key(draft_issuer_private())


def test_wit_svid_2_3_no_eddsa_signature() -> None:
    ed = ed25519.Ed25519PrivateKey.generate()
    bundles = BundleSet(
        [
            TrustBundle(
                EXAMPLE, jwt_authorities=(JwtAuthority("ed", ed.public_key(), use="wit-svid"),)
            )
        ]  # type: ignore[arg-type]
    )
    token = hand_sign(draft_header(alg="EdDSA", kid="ed"), _svid_claims(), ed, "EdDSA")
    assert verify_wit(token, bundles, now=NOW).kid == "ed"  # the WIMSE profile takes it
    assert code_of(token, bundles, profile="spiffe") == "wit_bad_alg"


def test_wit_svid_3_2_no_eddsa_cnf_key() -> None:
    ed = ed25519.Ed25519PrivateKey.generate().public_key()
    claims = _svid_claims(cnf={"jwk": {**public_jwk_members(ed), "alg": "EdDSA"}})
    assert code_of(resign(claims=claims), _svid_bundles(), profile="spiffe") == "wit_bad_cnf_alg"


def test_wit_svid_no_aud() -> None:
    token = resign(claims=_svid_claims(aud="https://rp.example.com"))
    assert verify_wit(token, _svid_bundles(), now=NOW).kid == "June 5"
    assert code_of(token, _svid_bundles(), profile="spiffe") == "wit_profile_violation"


def test_wit_svid_3_3_jti_is_not_used_for_replay() -> None:
    # The same WIT-SVID is presented with every request (its proof carries the
    # one-time jti), and two WIT-SVIDs sharing a jti are both still valid.
    claims = _svid_claims()
    first, second = resign(claims=claims), resign(claims={**claims, "exp": claims["exp"] + 1})
    for cache in (0, 16):
        verifier = WitVerifier(_svid_bundles(), now=NOW, profile="spiffe", max_entries=cache)
        for token in (first, first, second, second):
            assert verifier.verify(token).claims["jti"] == claims["jti"]


def test_wit_svid_3_6_iat_does_not_limit_earliest_validity() -> None:
    token = resign(claims=_svid_claims(iat=NOW + 3600))
    assert code_of(token, _svid_bundles()) == "wit_iat_in_future"  # WIMSE profile
    assert verify_wit(token, _svid_bundles(), now=NOW, profile="spiffe").kid == "June 5"
    # nbf does limit it (3.5)
    late = resign(claims=_svid_claims(nbf=NOW + 3600))
    assert code_of(late, _svid_bundles(), profile="spiffe") == "wit_not_yet_valid"


@pytest.mark.parametrize("use", ["jwt-svid", "x509-svid"])
def test_wit_svid_6_2_bundle_keys_must_say_use_wit_svid(use: str) -> None:
    token = resign(claims=_svid_claims())
    assert code_of(token, _svid_bundles(use), profile="spiffe") == "wit_key_wrong_use"
    assert verify_wit(token, _svid_bundles(), now=NOW, profile="spiffe").kid == "June 5"


def test_wit_svid_6_2_spiffe_bundle_entries_without_use_are_ignored() -> None:
    token = resign(claims=_svid_claims())
    jwk = _svid_bundles().get(EXAMPLE).jwt_authorities[0].jwk()
    del jwk["use"]
    spiffe = BundleSet([TrustBundle.from_spiffe_json(EXAMPLE, {"keys": [jwk]})])
    assert code_of(token, spiffe, profile="spiffe") == "wit_unknown_kid"


@pytest.mark.parametrize("profile", ["wimse", "spiffe"])
def test_a_saved_bundle_accepts_exactly_what_it_did_in_memory(
    tmp_path: Path, profile: str
) -> None:
    # The review of issue 7 found a plain-JWKS key refused under the spiffe profile in
    # memory but accepted after save + load (saved under both uses). One rule now: a key
    # imported without use= is valid for JWT-SVIDs and WITs alike (decision 0015), before
    # and after a round trip; a key given one use keeps exactly that use.
    token = resign(claims=_svid_claims())
    for use, expected in ((None, None), ("wit-svid", None), ("jwt-svid", "wit_key_wrong_use")):
        memory = _svid_bundles(use)
        path = tmp_path / f"{use}.json"
        memory.get(EXAMPLE).save(path)
        reloaded = BundleSet([TrustBundle.load(EXAMPLE, path)])
        for bundles in (memory, reloaded):
            if expected is None:
                assert verify_wit(token, bundles, now=NOW, profile=profile).kid == "June 5"
            else:
                assert code_of(token, bundles, profile=profile) == expected
