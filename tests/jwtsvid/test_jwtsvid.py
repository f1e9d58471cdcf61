"""JWT-SVIDs: mint through a key-store key, validate, interop with PyJWT and
jwcrypto, and one negative test per check (each showing the attack it stops)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from joserfc.jwk import ECKey
from jwcrypto import jwk as jwc_jwk
from jwcrypto import jwt as jwc_jwt

from custos.bundle import BundleSet, JwtAuthority, TrustBundle
from custos.identity import SpiffeId, TrustDomain
from custos.jwtsvid import (
    JwtAudienceError,
    JwtBadAlgorithmError,
    JwtBadSignatureError,
    JwtBadSubjectError,
    JwtExpiredError,
    JwtMalformedError,
    JwtMintError,
    JwtMissingClaimError,
    JwtNotYetValidError,
    JwtSvidError,
    JwtUnknownKeyError,
    JwtUntrustedDomainError,
    mint_jwt_svid,
    validate_jwt_svid,
)
from custos.keys import MemoryKeyStore
from custos.keys.jose import joserfc_key

TD = TrustDomain("example.org")
OTHER = TrustDomain("other.example")
SUB = SpiffeId.parse("spiffe://example.org/ns/prod/sa/web")
AUD = "spiffe://example.org/api"
NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
TTL = timedelta(minutes=5)
ALGS = ["ES256", "ES384", "RS256", "PS256"]


@pytest.fixture(scope="module")
def store() -> Iterator[MemoryKeyStore]:
    s = MemoryKeyStore()
    for alg in ALGS:
        s.create(alg.lower(), alg)
    s.create("eddsa", "EdDSA")
    s.create("other", "ES256")
    s.create("wit", "ES256")
    yield s
    s.close()


@pytest.fixture(scope="module")
def bundles(store: MemoryKeyStore) -> BundleSet:
    auths = [
        JwtAuthority(alg.lower(), store.public_key(alg.lower()), use="jwt-svid") for alg in ALGS
    ]  # type: ignore[arg-type]
    auths.append(JwtAuthority("wit", store.public_key("wit"), use="wit-svid"))  # type: ignore[arg-type]
    auths.append(JwtAuthority("eddsa", store.public_key("eddsa"), use="jwt-svid"))  # type: ignore[arg-type]
    return BundleSet(
        [
            TrustBundle(TD, jwt_authorities=tuple(auths)),
            TrustBundle(
                OTHER,
                jwt_authorities=(JwtAuthority("other", store.public_key("other"), use="jwt-svid"),),
            ),  # type: ignore[arg-type]
        ]
    )


def mint(store: MemoryKeyStore, name: str = "es256", alg: str = "ES256", **kwargs: Any) -> str:
    args: dict[str, Any] = {
        "kid": name,
        "spiffe_id": SUB,
        "audience": [AUD],
        "ttl": TTL,
        "now": NOW,
    }
    args.update(kwargs)
    return mint_jwt_svid(joserfc_key(store.get(name)), alg, **args)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], claims: Any, signature: bytes = b"") -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}.{b64(signature)}"


def good_claims(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {"sub": str(SUB), "aud": AUD, "exp": int((NOW + TTL).timestamp())}
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def sign_with_store(store: MemoryKeyStore, name: str, header: dict[str, Any], claims: Any) -> str:
    """A correctly signed token with whatever header/claims a test needs."""
    head = b64(json.dumps(header).encode())
    body = b64(json.dumps(claims).encode())
    sig = store.sign(name, f"{head}.{body}".encode())
    return f"{head}.{body}.{b64(sig)}"


def check(token: str, bundles: BundleSet, **kwargs: Any) -> Any:
    kwargs.setdefault("now", NOW)
    return validate_jwt_svid(token, AUD, bundles, **kwargs)


# ------------------------------------------------------------------ mint / validate


@pytest.mark.parametrize("alg", ALGS)
def test_mint_and_validate(store: MemoryKeyStore, bundles: BundleSet, alg: str) -> None:
    token = mint(store, alg.lower(), alg)
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header == {"typ": "JWT", "alg": alg, "kid": alg.lower()}
    svid = check(token, bundles)
    assert svid.spiffe_id == SUB
    assert svid.audience == (AUD,)
    assert svid.expiry == NOW + TTL
    assert svid.claims["iat"] == int(NOW.timestamp())
    assert svid.claims["aud"] == AUD  # a single audience is a string, as go-jose writes it
    assert "jti" not in svid.claims
    assert svid.token == token


def test_multiple_audiences_jti_and_extra_claims(store: MemoryKeyStore, bundles: BundleSet) -> None:
    token = mint(store, audience=[AUD, "other-aud"], jti=True, extra_claims={"team": "pay"})
    svid = check(token, bundles)
    assert svid.audience == (AUD, "other-aud")
    assert validate_jwt_svid(token, "other-aud", bundles, now=NOW).spiffe_id == SUB
    assert isinstance(svid.claims["jti"], str) and len(svid.claims["jti"]) >= 16
    assert svid.claims["team"] == "pay"
    assert mint(store, jti=True) != mint(store, jti=True)
    # a bare string audience is one audience, not a list of characters
    assert check(mint(store, audience=AUD), bundles).audience == (AUD,)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"alg": "HS256"}, "not allowed"),
        ({"alg": "none"}, "not allowed"),
        ({"audience": []}, "at least one audience"),
        ({"audience": [""]}, "non-empty strings"),
        ({"ttl": timedelta(0)}, "ttl must be at least 1"),
        ({"kid": ""}, "kid"),
        ({"extra_claims": {"sub": "spiffe://example.org/admin"}}, "may not set"),
        ({"extra_claims": {"exp": 1}}, "may not set"),
        ({"spiffe_id": "spiffe://example.org/x/"}, "must not end with"),
        ({"spiffe_id": 42}, "SpiffeId or a string"),
        ({"now": datetime(2026, 1, 1)}, "timezone-aware"),
    ],
)
def test_mint_argument_errors(store: MemoryKeyStore, kwargs: dict[str, Any], fragment: str) -> None:
    alg = kwargs.pop("alg", "ES256")
    with pytest.raises(ValueError, match=fragment):
        mint(store, "es256", alg, **kwargs)


def test_mint_with_key_that_does_not_fit_alg(store: MemoryKeyStore) -> None:
    with pytest.raises(JwtMintError) as info:
        mint(store, "es256", "RS256")
    assert info.value.code == "jwt_mint_error"


def _bundles_by_thumbprint(store: MemoryKeyStore, name: str) -> BundleSet:
    """A bundle whose authority's kid is the key's own JWK kid (its thumbprint)."""
    kid = store.get(name).public_jwk()["kid"]
    auth = JwtAuthority(kid, store.public_key(name), use="jwt-svid")  # type: ignore[arg-type]
    return BundleSet([TrustBundle(TD, jwt_authorities=(auth,))])


@pytest.mark.parametrize("name", ["es256", "rs256"])
def test_mint_with_a_store_key_positional_call(store: MemoryKeyStore, name: str) -> None:
    # The documented call with a StoreKey (no joserfc_key wrapping) signs in the store.
    key = store.get(name)
    kid = key.public_jwk()["kid"]
    token = mint_jwt_svid(key, name.upper(), kid, SUB, AUD, TTL, now=NOW)
    svid = check(token, _bundles_by_thumbprint(store, name))
    assert svid.spiffe_id == SUB


def test_mint_with_a_store_key_defaults_alg_and_kid(
    store: MemoryKeyStore, bundles: BundleSet
) -> None:
    # As mint_wit: alg and kid default to the members of the key's public JWK.
    key = store.get("es384")
    token = mint_jwt_svid(key, spiffe_id=SUB, audience=AUD, ttl=TTL, now=NOW)
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header == {"typ": "JWT", "alg": "ES384", "kid": key.public_jwk()["kid"]}
    assert check(token, _bundles_by_thumbprint(store, "es384")).spiffe_id == SUB
    # Explicit values still win over the JWK's.
    token = mint_jwt_svid(key, "ES384", "es384", SUB, AUD, TTL, now=NOW)
    assert check(token, bundles).spiffe_id == SUB


def test_mint_with_a_store_key_refuses_eddsa_and_missing_arguments(store: MemoryKeyStore) -> None:
    with pytest.raises(JwtSvidError, match="EdDSA"):
        mint_jwt_svid(store.get("eddsa"), spiffe_id=SUB, audience=AUD, ttl=TTL, now=NOW)
    with pytest.raises(JwtSvidError, match="spiffe_id, audience and ttl"):
        mint_jwt_svid(store.get("es256"), audience=AUD, ttl=TTL)
    # A joserfc key whose JWK has no alg/kid needs them given.
    bare = ECKey.generate_key("P-256")
    with pytest.raises(JwtSvidError, match="give alg="):
        mint_jwt_svid(bare, spiffe_id=SUB, audience=AUD, ttl=TTL)
    with pytest.raises(JwtSvidError, match="give kid="):
        mint_jwt_svid(bare, "ES256", spiffe_id=SUB, audience=AUD, ttl=TTL)
    assert mint_jwt_svid(bare, "ES256", "k1", SUB, AUD, TTL).count(".") == 2


# ------------------------------------------------------------------ interop


def test_pyjwt_and_jwcrypto_verify_our_tokens(store: MemoryKeyStore) -> None:
    for alg in ("ES256", "RS256", "PS256"):
        token = mint(store, alg.lower(), alg, now=datetime.now(UTC))
        public = store.public_key(alg.lower())
        claims = pyjwt.decode(token, public, algorithms=[alg], audience=AUD)  # type: ignore[arg-type]
        assert claims["sub"] == str(SUB)
        pem = public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        key = jwc_jwk.JWK.from_pem(pem)
        verified = jwc_jwt.JWT(jwt=token, key=key, algs=[alg])
        assert json.loads(verified.claims)["sub"] == str(SUB)


def test_token_minted_by_pyjwt_validates(bundles: BundleSet) -> None:
    # PyJWT needs the private key; a plain software key stands in for
    # "some other SPIFFE implementation".
    key = ec.generate_private_key(ec.SECP256R1())
    own = BundleSet(
        [TrustBundle(TD, jwt_authorities=(JwtAuthority("py", key.public_key(), use="jwt-svid"),))]
    )
    token = pyjwt.encode(
        {
            "sub": str(SUB),
            "aud": [AUD],
            "exp": int((NOW + TTL).timestamp()),
            "iat": int(NOW.timestamp()),
        },
        key,
        algorithm="ES256",
        headers={"kid": "py"},
    )
    svid = check(token, own)
    assert svid.spiffe_id == SUB and svid.audience == (AUD,)
    with pytest.raises(JwtUnknownKeyError):
        check(token, bundles)  # our own bundle does not know kid "py"


# ------------------------------------------------------------------ algorithm attacks


def test_alg_none_is_rejected(bundles: BundleSet) -> None:
    token = forge({"alg": "none", "typ": "JWT", "kid": "es256"}, good_claims())
    with pytest.raises(JwtBadAlgorithmError) as info:
        check(token, bundles)
    assert info.value.code == "jwt_bad_alg"


def test_hs256_keyed_with_public_key_is_rejected(store: MemoryKeyStore, bundles: BundleSet) -> None:
    """Key confusion: HMAC over the token with the (public) RSA key as secret."""
    header = {"alg": "HS256", "typ": "JWT", "kid": "rs256"}
    head = b64(json.dumps(header).encode())
    body = b64(json.dumps(good_claims()).encode())
    secret = store.public_key("rs256").public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    with pytest.raises(JwtBadAlgorithmError, match="HS256"):
        check(f"{head}.{body}.{b64(sig)}", bundles)


def test_symmetric_algorithms_cannot_be_allowed(bundles: BundleSet) -> None:
    with pytest.raises(ValueError, match="HS256"):
        check("x.y.z", bundles, algorithms=("ES256", "HS256"))
    with pytest.raises(ValueError, match="none"):
        check("x.y.z", bundles, algorithms=("none",))
    with pytest.raises(ValueError, match="empty"):
        check("x.y.z", bundles, algorithms=())


def test_alg_outside_callers_allowlist(store: MemoryKeyStore, bundles: BundleSet) -> None:
    token = mint(store, "rs256", "RS256")
    with pytest.raises(JwtBadAlgorithmError):
        check(token, bundles, algorithms=("ES256",))


def test_eddsa_is_not_a_jwt_svid_algorithm(store: MemoryKeyStore, bundles: BundleSet) -> None:
    # JWT-SVID 2.1: alg is one of RFC 7518 3.3-3.5 (RS/ES/PS); others MUST be
    # rejected. An EdDSA token signed by a key the bundle does hold still fails.
    with pytest.raises(ValueError, match="not allowed"):
        mint(store, "eddsa", "EdDSA")
    ed = sign_with_store(store, "eddsa", {"alg": "EdDSA", "kid": "eddsa"}, good_claims())
    with pytest.raises(JwtBadAlgorithmError):
        check(ed, bundles)
    with pytest.raises(ValueError, match="not allowed"):
        check(ed, bundles, algorithms=("EdDSA",))


def test_alg_that_does_not_fit_the_key(store: MemoryKeyStore, bundles: BundleSet) -> None:
    # Signed by the EC key, but the header claims RS256 for the EC kid.
    token = sign_with_store(store, "es256", {"alg": "RS256", "kid": "es256"}, good_claims())
    with pytest.raises(JwtBadAlgorithmError):
        check(token, bundles)
    # ES384 header on a P-256 key
    token = sign_with_store(store, "es256", {"alg": "ES384", "kid": "es256"}, good_claims())
    with pytest.raises(JwtBadAlgorithmError, match="cannot verify ES384"):
        check(token, bundles)


def test_authority_alg_pins_the_algorithm(store: MemoryKeyStore) -> None:
    pinned = BundleSet(
        [
            TrustBundle(
                TD,
                jwt_authorities=(
                    JwtAuthority("es256", store.public_key("es256"), "jwt-svid", "ES384"),
                ),
            )
        ]  # type: ignore[arg-type]
    )
    with pytest.raises(JwtBadAlgorithmError, match="is for ES384"):
        check(mint(store), pinned)


# ------------------------------------------------------------------ key selection


def test_kid_required(store: MemoryKeyStore, bundles: BundleSet) -> None:
    token = sign_with_store(store, "es256", {"alg": "ES256", "typ": "JWT"}, good_claims())
    with pytest.raises(JwtUnknownKeyError, match="no 'kid'") as info:
        check(token, bundles)
    assert info.value.code == "jwt_unknown_kid"


def test_kid_not_found(store: MemoryKeyStore, bundles: BundleSet) -> None:
    token = mint(store, kid="nope")
    with pytest.raises(JwtUnknownKeyError, match="'nope'"):
        check(token, bundles)


def test_key_of_another_trust_domain_cannot_sign_for_this_one(
    store: MemoryKeyStore, bundles: BundleSet
) -> None:
    """other.example is federated (trusted for its own IDs); its key must not
    mint tokens for example.org identities."""
    token = mint(store, "other")  # sub is in example.org, kid "other" is other.example's
    with pytest.raises(JwtUnknownKeyError):
        check(token, bundles)
    # Even when it borrows a kid that exists in example.org's bundle:
    token = mint(store, "other", kid="es256")
    with pytest.raises(JwtBadSignatureError):
        check(token, bundles)
    # Its own IDs validate.
    own = mint(store, "other", spiffe_id=SpiffeId.parse("spiffe://other.example/svc"))
    assert check(own, bundles).spiffe_id.trust_domain == OTHER


def test_wit_svid_key_does_not_validate_jwt_svids(
    store: MemoryKeyStore, bundles: BundleSet
) -> None:
    token = mint(store, "wit")
    with pytest.raises(JwtUnknownKeyError, match="not a JWT-SVID authority"):
        check(token, bundles)


def test_untrusted_trust_domain(store: MemoryKeyStore, bundles: BundleSet) -> None:
    token = mint(store, spiffe_id=SpiffeId.parse("spiffe://unknown.example/x"))
    with pytest.raises(JwtUntrustedDomainError) as info:
        check(token, bundles)
    assert info.value.code == "jwt_untrusted_domain"


# ------------------------------------------------------------------ signature


def test_tampered_signature(store: MemoryKeyStore, bundles: BundleSet) -> None:
    head, body, sig = mint(store).split(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "=="))
    raw[5] ^= 0x01
    with pytest.raises(JwtBadSignatureError) as info:
        check(f"{head}.{body}.{b64(bytes(raw))}", bundles)
    assert info.value.code == "jwt_bad_signature"


def test_tampered_payload(store: MemoryKeyStore, bundles: BundleSet) -> None:
    """Swap the subject for another identity of the same trust domain."""
    head, _, sig = mint(store).split(".")
    body = b64(json.dumps(good_claims(sub="spiffe://example.org/admin")).encode())
    with pytest.raises(JwtBadSignatureError):
        check(f"{head}.{body}.{sig}", bundles)


# ------------------------------------------------------------------ claims


def test_wrong_audience(store: MemoryKeyStore, bundles: BundleSet) -> None:
    token = mint(store, audience=["spiffe://example.org/other-service"])
    with pytest.raises(JwtAudienceError) as info:
        check(token, bundles)
    assert info.value.code == "jwt_bad_audience"


def test_missing_aud(store: MemoryKeyStore, bundles: BundleSet) -> None:
    token = sign_with_store(store, "es256", {"alg": "ES256", "kid": "es256"}, good_claims(aud=None))
    with pytest.raises(JwtMissingClaimError, match="'aud'") as info:
        check(token, bundles)
    assert info.value.code == "jwt_missing_claim"


@pytest.mark.parametrize("aud", [[], 5, [AUD, 5], {"a": 1}])
def test_malformed_aud(store: MemoryKeyStore, bundles: BundleSet, aud: Any) -> None:
    token = sign_with_store(store, "es256", {"alg": "ES256", "kid": "es256"}, good_claims(aud=aud))
    with pytest.raises(JwtMalformedError, match="'aud'"):
        check(token, bundles)


def test_expired(store: MemoryKeyStore, bundles: BundleSet) -> None:
    token = mint(store)
    exp = NOW + TTL
    assert check(token, bundles, now=exp + timedelta(seconds=29)).spiffe_id == SUB  # within leeway
    with pytest.raises(JwtExpiredError) as info:
        check(token, bundles, now=exp + timedelta(seconds=30))
    assert info.value.code == "jwt_expired"
    with pytest.raises(JwtExpiredError):
        check(token, bundles, now=exp, leeway=timedelta(0))


def test_missing_or_bad_exp(store: MemoryKeyStore, bundles: BundleSet) -> None:
    token = sign_with_store(store, "es256", {"alg": "ES256", "kid": "es256"}, good_claims(exp=None))
    with pytest.raises(JwtMissingClaimError, match="'exp'"):
        check(token, bundles)
    token = sign_with_store(
        store, "es256", {"alg": "ES256", "kid": "es256"}, good_claims(exp="tomorrow")
    )
    with pytest.raises(JwtMalformedError, match="'exp'"):
        check(token, bundles)
    token = sign_with_store(store, "es256", {"alg": "ES256", "kid": "es256"}, good_claims(exp=True))
    with pytest.raises(JwtMalformedError, match="'exp'"):
        check(token, bundles)


def test_not_yet_valid(store: MemoryKeyStore, bundles: BundleSet) -> None:
    nbf = int((NOW + timedelta(minutes=2)).timestamp())
    token = sign_with_store(store, "es256", {"alg": "ES256", "kid": "es256"}, good_claims(nbf=nbf))
    with pytest.raises(JwtNotYetValidError):
        check(token, bundles)
    assert check(token, bundles, now=NOW + timedelta(minutes=2)).spiffe_id == SUB


@pytest.mark.parametrize(
    ("sub", "error"),
    [
        (None, JwtMissingClaimError),
        (42, JwtBadSubjectError),
        ("https://example.org/web", JwtBadSubjectError),
        ("spiffe://example.org/a/../admin", JwtBadSubjectError),
        ("wimse://example.org/web", JwtBadSubjectError),
    ],
)
def test_bad_subject(
    store: MemoryKeyStore, bundles: BundleSet, sub: Any, error: type[JwtSvidError]
) -> None:
    token = sign_with_store(store, "es256", {"alg": "ES256", "kid": "es256"}, good_claims(sub=sub))
    with pytest.raises(error):
        check(token, bundles)


# ------------------------------------------------------------------ malformed


def _head(**extra: Any) -> str:
    return b64(json.dumps({"alg": "ES256", "kid": "es256", **extra}).encode())


_GOOD_HEAD = b64(json.dumps({"alg": "ES256", "kid": "es256"}).encode())
_GOOD_BODY = b64(json.dumps(good_claims()).encode())


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        "!!!.@@@.###",
        f"{b64(b'not json')}.{_GOOD_BODY}.AAAA",
        f"{b64(b'[1]')}.{_GOOD_BODY}.AAAA",
        f"{_GOOD_HEAD}.{b64(b'not json')}.AAAA",
        f"{_GOOD_HEAD}.{b64(b'[1, 2]')}.AAAA",
        f"{_GOOD_HEAD}.{_GOOD_BODY}.AAAA\u00e9",
        f"{_GOOD_HEAD}.{_GOOD_BODY}." + "A" * 70_000,
        f"{_head(typ='secevent+jwt')}.{_GOOD_BODY}.AAAA",
        f"{_head(crit=['exp'])}.{_GOOD_BODY}.AAAA",
        f"{_head(b64=False, crit=['b64'])}..AAAA",
    ],
)
def test_malformed_tokens(bundles: BundleSet, token: str) -> None:
    with pytest.raises(JwtMalformedError) as info:
        check(token, bundles)
    assert info.value.code == "jwt_malformed"


def test_non_string_token(bundles: BundleSet) -> None:
    with pytest.raises(JwtMalformedError):
        check(b"a.b.c", bundles)  # type: ignore[arg-type]


def test_validate_argument_errors(store: MemoryKeyStore, bundles: BundleSet) -> None:
    token = mint(store)
    with pytest.raises(ValueError, match="audience"):
        validate_jwt_svid(token, "", bundles, now=NOW)
    with pytest.raises(ValueError, match="leeway"):
        validate_jwt_svid(token, AUD, bundles, now=NOW, leeway=timedelta(seconds=-1))
    with pytest.raises(ValueError, match="timezone-aware"):
        validate_jwt_svid(token, AUD, bundles, now=datetime(2026, 5, 1))


# -- review findings: hostile nesting and unusable dates --------------------------


def _b64(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.mark.parametrize("where", ["header", "payload"])
def test_deeply_nested_json_is_malformed_not_a_crash(where: str) -> None:
    from custos.bundle import BundleSet
    from custos.jwtsvid.errors import JwtMalformedError

    deep = b"[" * 5000 + b"]" * 5000
    header = deep if where == "header" else b'{"alg":"ES256","kid":"k"}'
    payload = deep if where == "payload" else b"{}"
    token = f"{_b64(header)}.{_b64(payload)}.{_b64(b'sig')}"
    with pytest.raises(JwtMalformedError):
        validate_jwt_svid(token, "aud", BundleSet())


@pytest.mark.parametrize("exp", [float("nan"), 1e300, 253402300800, -1])
def test_unusable_exp_is_malformed_even_when_signed(exp: float) -> None:
    import json

    from cryptography.hazmat.primitives.asymmetric import ec
    from joserfc import jws
    from joserfc.jwk import ECKey

    from custos.bundle import BundleSet, JwtAuthority, TrustBundle
    from custos.identity import TrustDomain
    from custos.jwtsvid.errors import JwtMalformedError

    key = ec.generate_private_key(ec.SECP256R1())
    td = TrustDomain.parse("example.org")
    bundles = BundleSet(
        [TrustBundle(td, (), (JwtAuthority("k1", key.public_key(), None, "ES256"),))]
    )
    payload = json.dumps({"sub": "spiffe://example.org/w", "aud": "aud", "exp": exp}).encode()
    token = jws.serialize_compact({"alg": "ES256", "kid": "k1"}, payload, ECKey.import_key(key))
    with pytest.raises(JwtMalformedError):
        validate_jwt_svid(token, "aud", bundles)


def test_trust_domain_id_is_not_a_workload_subject(
    store: MemoryKeyStore, bundles: BundleSet
) -> None:
    # Attack: a token whose sub is the bare trust domain would match policies
    # written for "any member of example.org" without naming any workload.
    token = sign_with_store(
        store, "es256", {"alg": "ES256", "kid": "es256"}, good_claims(sub="spiffe://example.org")
    )
    with pytest.raises(JwtBadSubjectError):
        check(token, bundles)
    with pytest.raises(ValueError, match="needs a path"):
        mint(store, spiffe_id=SpiffeId.parse("spiffe://example.org"))


# -- issue 7: one strict decoder, finite numbers, clear refusals ------------------------


def _raw_signed(store: MemoryKeyStore, head: bytes, body: bytes, name: str = "es256") -> str:
    signing_input = f"{b64(head)}.{b64(body)}"
    return f"{signing_input}.{b64(store.sign(name, signing_input.encode()))}"


_EXP = int((NOW + TTL).timestamp())


@pytest.mark.parametrize(
    ("head", "body"),
    [
        # item 13: the WIT path refuses these; JWT-SVIDs took the last member
        (
            b'{"alg":"ES256","kid":"es256"}',
            b'{"sub":"spiffe://example.org/admin","sub":"spiffe://example.org/ns/prod/sa/web",'
            b'"aud":"spiffe://example.org/api","exp":%d}' % _EXP,
        ),
        (
            b'{"alg":"ES256","kid":"nope","kid":"es256"}',
            b'{"sub":"spiffe://example.org/ns/prod/sa/web","aud":"spiffe://example.org/api",'
            b'"exp":%d}' % _EXP,
        ),
        (
            b'{"alg":"ES256","kid":"es256"}',
            b'{"sub":"spiffe://example.org/ns/prod/sa/web","aud":"spiffe://example.org/api",'
            b'"exp":%d,"x":{"a":1,"a":2}}' % _EXP,
        ),
    ],
)
def test_duplicate_members_are_refused_even_when_signed(
    store: MemoryKeyStore, bundles: BundleSet, head: bytes, body: bytes
) -> None:
    token = _raw_signed(store, head, body)
    with pytest.raises(JwtMalformedError) as info:
        check(token, bundles)
    assert info.value.code == "jwt_malformed"


def test_lone_surrogate_aud_against_non_ascii_audience_is_a_clear_refusal(
    store: MemoryKeyStore, bundles: BundleSet
) -> None:
    # item 12: a configured audience with non-ASCII text, a token aud that is
    # not even valid Unicode: a JWT-SVID error, never a crash.
    body = (
        b'{"sub":"spiffe://example.org/ns/prod/sa/web","aud":"\\ud800caf\\u00e9","exp":%d}' % _EXP
    )
    token = _raw_signed(store, b'{"alg":"ES256","kid":"es256"}', body)
    with pytest.raises(JwtSvidError) as info:
        validate_jwt_svid(token, "caf\u00e9", bundles, now=NOW)
    assert info.value.code == "jwt_malformed"
    with pytest.raises(ValueError, match="audience"):
        validate_jwt_svid(token, "caf\udc00", bundles, now=NOW)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), True, "30"])
def test_non_finite_leeway_is_refused(
    store: MemoryKeyStore, bundles: BundleSet, value: Any
) -> None:
    # item 11: a NaN leeway makes every "now - leeway >= exp" false: never expired.
    token = mint(store)
    with pytest.raises(JwtSvidError) as info:
        check(token, bundles, leeway=value, now=NOW + timedelta(days=365))
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_pinned_clock_is_refused(
    store: MemoryKeyStore, bundles: BundleSet, value: float
) -> None:
    token = mint(store)
    with pytest.raises(JwtSvidError):
        validate_jwt_svid(token, AUD, bundles, now=value)  # type: ignore[arg-type]
    with pytest.raises(JwtSvidError):
        mint(store, now=value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0, -5, True])
def test_non_finite_or_non_positive_ttl_is_refused(store: MemoryKeyStore, value: Any) -> None:
    with pytest.raises(JwtSvidError) as info:
        mint(store, ttl=value)
    assert isinstance(info.value, ValueError)


def test_plain_numbers_and_strings_are_accepted(store: MemoryKeyStore, bundles: BundleSet) -> None:
    # New-user finding: seconds as numbers, a pinned clock as epoch seconds,
    # the SPIFFE ID as the string the user has.
    token = mint(store, spiffe_id=str(SUB), ttl=300, now=NOW.timestamp())
    svid = validate_jwt_svid(token, AUD, bundles, now=NOW.timestamp() + 320, leeway=30)
    assert svid.spiffe_id == SUB
    with pytest.raises(JwtExpiredError):
        validate_jwt_svid(token, AUD, bundles, now=NOW.timestamp() + 340, leeway=30)
