"""WIT/WPT handling on custos' JOSE core, checked against independent
implementations and against the attacks their checks stop: strict base64url,
strict JSON, JWS signature checks (``signature_valid`` over
``custos._jose.verify_signature``), the cnf key import and its cache, and
``create_wpt``'s WIT cache and device-key signing."""

from __future__ import annotations

import base64
import json
import secrets
from datetime import timedelta
from types import MappingProxyType
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given
from hypothesis import strategies as st
from joserfc import jws
from joserfc.jwk import ECKey, OKPKey, RSAKey

from custos.bundle import BundleSet, JwtAuthority, TrustBundle
from custos.errors import CustosError
from custos.identity import TrustDomain, WimseId
from custos.keys.jose import joserfc_key
from custos.keys.jwk import public_jwk_members
from custos.keys.software import MemoryKeyStore
from custos.wimse.errors import WitError, WptError
from custos.wimse.http.message import HttpMessage
from custos.wimse.replay import MemoryReplayCache
from custos.wimse.wit import (
    VerifiedWit,
    WitVerifier,
    b64url_decode_strict,
    json_object_strict,
    mint_wit,
    parse_wit_unverified,
    signature_valid,
    token_hash,
    verify_wit,
)
from custos.wimse.wpt import WptMintError, WptVerifier, create_wpt, wpt_headers

NOW = 1745509000
EXAMPLE = TrustDomain("example.com")
ORIGIN = "https://api.example.com"
SUB = WimseId.parse("wimse://example.com/svc/a")
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def reference_strict_decode(value: str) -> bytes:
    """The obvious definition: only the alphabet, and re-encoding gives the input back."""
    if any(c not in ALPHABET for c in value) or len(value) % 4 == 1:
        raise ValueError
    raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    if b64(raw) != value:
        raise ValueError
    return raw


# -- strict base64url and JSON --------------------------------------------------------


@given(st.text(alphabet=ALPHABET + "=+/ \n.\x00é", max_size=12))
def test_property_b64url_strict_matches_the_reference(value: str) -> None:
    try:
        expected: bytes | None = reference_strict_decode(value)
    except ValueError:
        expected = None
    if expected is None:
        with pytest.raises(ValueError):
            b64url_decode_strict(value)
    else:
        assert b64url_decode_strict(value) == expected


@given(st.binary(max_size=80))
def test_property_b64url_strict_roundtrips(data: bytes) -> None:
    assert b64url_decode_strict(b64(data)) == data


@pytest.mark.parametrize("value", ["QUJD\n", "QUI\n", "QUJD=", "QU+D", "QU/D", "QUJD "])
def test_attack_b64url_trailing_newline_and_foreign_characters(value: str) -> None:
    # "^...$" would have let a trailing newline through; each of these is
    # another spelling of bytes that already have one.
    with pytest.raises(ValueError):
        b64url_decode_strict(value)


def test_attack_json_bom_and_nested_duplicates_refused() -> None:
    with pytest.raises(ValueError):
        json_object_strict('\ufeff{"a":1}'.encode())
    with pytest.raises(ValueError):
        json_object_strict(b'{"cnf":{"jwk":{"x":"a","x":"b"}}}')
    with pytest.raises(ValueError):
        json_object_strict(b'{"exp":NaN}')
    with pytest.raises(ValueError):
        json_object_strict(b'{"a":1} {"b":2}')
    assert json_object_strict(b'{"a":{"b":[1,{"c":null}]}}') == {"a": {"b": [1, {"c": None}]}}


# -- signature_valid against joserfc -----------------------------------------------------

EC_KEYS = {
    "ES256": ec.generate_private_key(ec.SECP256R1()),
    "ES384": ec.generate_private_key(ec.SECP384R1()),
    "ES512": ec.generate_private_key(ec.SECP521R1()),
}
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ED_KEY = ed25519.Ed25519PrivateKey.generate()
ALL_ALGS = [
    "ES256",
    "ES384",
    "ES512",
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "EdDSA",
]


def private_for(alg: str) -> Any:
    if alg in EC_KEYS:
        return EC_KEYS[alg]
    return ED_KEY if alg == "EdDSA" else RSA_KEY


def joserfc_private(alg: str) -> ECKey | RSAKey | OKPKey:
    key = private_for(alg)
    if alg in EC_KEYS:
        return ECKey.import_key(key)
    return OKPKey.import_key(key) if alg == "EdDSA" else RSAKey.import_key(key)


def joserfc_token(alg: str, payload: bytes = b'{"hello":"world"}') -> tuple[bytes, bytes]:
    """(signing input, signature) of a JWS made by joserfc."""
    token = jws.serialize_compact({"alg": alg}, payload, joserfc_private(alg), algorithms=[alg])
    h, p, s = token.split(".")
    return f"{h}.{p}".encode(), b64url_decode_strict(s)


signature_ok = signature_valid


@pytest.mark.parametrize("alg", ALL_ALGS)
def test_signature_ok_accepts_what_joserfc_signs(alg: str) -> None:
    signing_input, signature = joserfc_token(alg)
    assert signature_ok(private_for(alg).public_key(), alg, signing_input, signature)


@pytest.mark.parametrize("alg", ALL_ALGS)
def test_attack_signature_ok_refuses_tampering(alg: str) -> None:
    signing_input, signature = joserfc_token(alg)
    public = private_for(alg).public_key()
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    assert not signature_ok(public, alg, signing_input, flipped)
    assert not signature_ok(public, alg, signing_input + b"x", signature)
    assert not signature_ok(public, alg, signing_input, signature[:-1])
    assert not signature_ok(public, alg, signing_input, signature + b"\x00")
    assert not signature_ok(public, alg, signing_input, b"")
    # another key of the same kind
    other: Any = {
        "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
        "ES384": lambda: ec.generate_private_key(ec.SECP384R1()),
        "ES512": lambda: ec.generate_private_key(ec.SECP521R1()),
        "EdDSA": ed25519.Ed25519PrivateKey.generate,
    }.get(alg)
    if other is not None:
        assert not signature_ok(other().public_key(), alg, signing_input, signature)


@pytest.mark.parametrize("value", [b"\x00", b"\xff"])
def test_ecdsa_out_of_range_r_s_is_just_invalid(value: bytes) -> None:
    # r = s = 0 and r, s >= n: refused without an exception escaping
    public = EC_KEYS["ES256"].public_key()
    assert not signature_ok(public, "ES256", b"a.b", value * 64)


def test_attack_signature_ok_refuses_key_alg_confusion() -> None:
    # ES384 signature made with the P-384 key, presented as ES256 / ES512
    signing_input, signature = joserfc_token("ES384")
    p384 = EC_KEYS["ES384"].public_key()
    assert not signature_ok(p384, "ES256", signing_input, signature)
    assert not signature_ok(p384, "ES512", signing_input, signature)
    # an RSA PKCS#1 signature is not a PSS one and the other way round
    rs_input, rs_sig = joserfc_token("RS256")
    assert not signature_ok(RSA_KEY.public_key(), "PS256", rs_input, rs_sig)
    ps_input, ps_sig = joserfc_token("PS256")
    assert not signature_ok(RSA_KEY.public_key(), "RS256", ps_input, ps_sig)
    # hash confusion inside one family
    assert not signature_ok(RSA_KEY.public_key(), "RS384", rs_input, rs_sig)
    # symmetric and "none" never verify, whatever the key
    for alg in ("none", "HS256", "RS1", ""):
        assert not signature_ok(EC_KEYS["ES256"].public_key(), alg, b"a.b", b"")
    # a private key object is not a public key
    assert not signature_ok(EC_KEYS["ES256"], "ES256", signing_input, signature)


@pytest.mark.filterwarnings("ignore:Key size should be")
def test_attack_signature_ok_refuses_short_rsa_keys() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    token = jws.serialize_compact(
        {"alg": "RS256"}, b"{}", RSAKey.import_key(weak), algorithms=["RS256"]
    )
    h, p, s = token.split(".")
    assert not signature_ok(
        weak.public_key(), "RS256", f"{h}.{p}".encode(), b64url_decode_strict(s)
    )


# -- the cnf key import ------------------------------------------------------------------


def unsigned_wit(cnf_jwk: dict[str, Any]) -> str:
    """A WIT-shaped token; parse_wit_unverified judges cnf before any signature."""
    header = {"alg": "ES256", "kid": "k", "typ": "wit+jwt"}
    claims = {"sub": str(SUB), "exp": NOW + 60, "cnf": {"jwk": cnf_jwk}}
    return ".".join(
        (b64(json.dumps(header).encode()), b64(json.dumps(claims).encode()), b64(b"\x00" * 64))
    )


def p256_jwk(key: ec.EllipticCurvePrivateKey | None = None) -> dict[str, Any]:
    k = key or ec.generate_private_key(ec.SECP256R1())
    return {**public_jwk_members(k.public_key()), "alg": "ES256"}


def cnf_code(jwk: dict[str, Any]) -> str:
    with pytest.raises(WitError) as info:
        parse_wit_unverified(unsigned_wit(jwk))
    return info.value.code


def test_cnf_unknown_ec_curve_is_a_wit_error() -> None:
    # joserfc's own import raised a bare KeyError here (a 500, not a 400).
    assert cnf_code({**p256_jwk(), "crv": "P-999"}) == "wit_bad_cnf"
    assert cnf_code({**p256_jwk(), "crv": "secp256k1", "alg": "ES256"}) == "wit_bad_cnf"


def test_attack_cnf_point_not_on_curve_and_non_canonical_coordinates() -> None:
    jwk = p256_jwk()
    y = b64url_decode_strict(jwk["y"])
    off_curve = b64(y[:-1] + bytes([y[-1] ^ 1]))
    assert cnf_code({**jwk, "y": off_curve}) == "wit_bad_cnf"
    # same coordinate, stray low bits in the last character: another spelling
    last = jwk["x"][-1]
    twin = ALPHABET[ALPHABET.index(last) ^ 1]
    assert cnf_code({**jwk, "x": jwk["x"][:-1] + twin}) == "wit_bad_cnf"
    # a P-256 point declared as P-384: 32-byte coordinates are not P-384's
    # exact 48-byte encoding (RFC 7518 6.2.1.2)
    assert cnf_code({**jwk, "crv": "P-384", "alg": "ES384"}) == "wit_weak_cnf"


def test_cnf_import_gives_fresh_joserfc_keys_around_the_right_key() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = p256_jwk(key)
    a = parse_wit_unverified(unsigned_wit(jwk)).cnf_key
    b = parse_wit_unverified(unsigned_wit(jwk)).cnf_key
    assert a is not b  # joserfc keys are mutable (ensure_kid): never shared
    assert a.public_key == key.public_key() == b.public_key
    other = parse_wit_unverified(unsigned_wit(p256_jwk())).cnf_key
    assert other.public_key != key.public_key()
    assert dict(a.as_dict()) == {k: v for k, v in jwk.items() if k != "alg"}


@pytest.fixture(scope="module")
def store() -> MemoryKeyStore:
    s = MemoryKeyStore()
    s.create("issuer", "ES256")
    s.create("wl-a", "ES256")
    s.create("wl-b", "ES256")
    s.create("wl-ed", "EdDSA")
    return s


@pytest.fixture(scope="module")
def bundles(store: MemoryKeyStore) -> BundleSet:
    key = store.public_key("issuer")
    return BundleSet(
        [TrustBundle(EXAMPLE, jwt_authorities=(JwtAuthority("issuer", key, use="wit-svid"),))]  # type: ignore[arg-type]
    )


def mint(store: MemoryKeyStore, workload: str, subject: WimseId = SUB) -> str:
    return mint_wit(
        joserfc_key(store.get("issuer")),
        "ES256",
        "issuer",
        subject,
        store.public_jwk(workload),
        timedelta(hours=1),
        now=NOW - 60,
    )


def request(wit: str, wpt: str) -> HttpMessage:
    return HttpMessage.request("GET", "/pay", wpt_headers(wit, wpt))


@pytest.mark.parametrize("cache", [0, 64])
def test_attack_cross_workload_proofs_refused_with_warm_caches(
    store: MemoryKeyStore, bundles: BundleSet, cache: int
) -> None:
    wit_a, wit_b = mint(store, "wl-a"), mint(store, "wl-b")
    key_a, key_b = joserfc_key(store.get("wl-a")), joserfc_key(store.get("wl-b"))
    v = WptVerifier(
        wit_verifier=WitVerifier(bundles, now=NOW, max_entries=cache),
        audiences=[ORIGIN],
        replay=MemoryReplayCache(clock=lambda: NOW),
        now=NOW,
    )
    for _ in range(2):  # the second round runs on warm WIT and cnf-key caches
        assert v.verify(request(wit_a, create_wpt(key_a, wit_a, ORIGIN + "/pay", now=NOW)))
        assert v.verify(request(wit_b, create_wpt(key_b, wit_b, ORIGIN + "/pay", now=NOW)))
    # B's key signing a proof that names A's WIT (a hand-made one: create_wpt refuses)
    forged = create_wpt(key_b, wit_b, ORIGIN + "/pay", now=NOW)
    h, p, _ = forged.split(".")
    claims = json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))
    claims["wth"] = token_hash(wit_a)
    payload = b64(json.dumps(claims).encode())
    sig = store.sign("wl-b", f"{h}.{payload}".encode())
    with pytest.raises(WptError) as info:
        v.verify(request(wit_a, f"{h}.{payload}.{b64(sig)}"))
    assert info.value.code == "wpt_bad_signature"


def test_attack_wpt_checked_against_a_cnf_key_that_does_not_fit_its_alg(
    store: MemoryKeyStore, bundles: BundleSet
) -> None:
    # A VerifiedWit built by other code (as the HTTP-signature tests do) whose
    # cnf key is P-384 while cnf_alg says ES256: the proof is refused, not
    # checked with the wrong curve.
    wit = mint(store, "wl-a")
    good = WitVerifier(bundles, now=NOW).verify(wit)
    p384 = ec.generate_private_key(ec.SECP384R1())

    class Lying:
        def verify(self, token: str) -> VerifiedWit:
            return VerifiedWit(
                subject=good.subject,
                trust_domain=good.trust_domain,
                claims=good.claims,
                cnf_jwk=MappingProxyType({**public_jwk_members(p384.public_key()), "alg": "ES256"}),
                cnf_key=ECKey.import_key(p384.public_key()),
                cnf_alg="ES256",
                expires_at=good.expires_at,
                token_hash=good.token_hash,
                kid=good.kid,
            )

    v = WptVerifier(
        wit_verifier=Lying(),  # type: ignore[arg-type]
        audiences=[ORIGIN],
        replay=MemoryReplayCache(clock=lambda: NOW),
        now=NOW,
    )
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    header = b64(b'{"alg":"ES256","typ":"wpt+jwt"}')
    claims = {"aud": ORIGIN + "/pay", "exp": NOW + 60, "jti": "j1", "wth": token_hash(wit)}
    si = f"{header}.{b64(json.dumps(claims).encode())}"
    r, s = decode_dss_signature(p384.sign(si.encode(), ec.ECDSA(hashes.SHA256())))
    token = f"{si}.{b64(r.to_bytes(48, 'big') + s.to_bytes(48, 'big'))}"
    with pytest.raises(WptError) as info:
        v.verify(request(wit, token))
    assert info.value.code == "wpt_bad_signature"


# -- create_wpt ----------------------------------------------------------------------------


def test_create_wpt_device_path_is_a_standard_jws(store: MemoryKeyStore) -> None:
    for name, alg in (("wl-a", "ES256"), ("wl-ed", "EdDSA")):
        wit = mint(store, name)
        wpt = create_wpt(joserfc_key(store.get(name)), wit, ORIGIN + "/pay?x=1", now=NOW)
        assert pyjwt.get_unverified_header(wpt) == {"alg": alg, "typ": "wpt+jwt"}
        claims = pyjwt.decode(
            wpt,
            store.public_key(name),  # type: ignore[arg-type]
            algorithms=[alg],
            audience=ORIGIN + "/pay",
            options={"verify_exp": False},
        )
        assert claims["wth"] == token_hash(wit) and claims["exp"] == NOW + 60


def test_create_wpt_in_process_joserfc_key_still_works(store: MemoryKeyStore) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    store_b = MemoryKeyStore()
    store_b.import_key("w", key)
    wit = mint_wit(
        joserfc_key(store.get("issuer")),
        "ES256",
        "issuer",
        SUB,
        store_b.public_jwk("w"),
        timedelta(hours=1),
        now=NOW - 60,
    )
    wpt = create_wpt(ECKey.import_key(key), wit, ORIGIN + "/pay", now=NOW)
    assert pyjwt.decode(
        wpt,
        key.public_key(),
        algorithms=["ES256"],
        audience=ORIGIN + "/pay",
        options={"verify_exp": False},
    )["wth"] == token_hash(wit)


def test_attack_create_wpt_follows_a_rotated_wit(store: MemoryKeyStore) -> None:
    # The WIT cache is keyed by the token itself: after the WIT rotates to
    # another key, the old signer is refused, and the right one is used.
    wit_a, wit_b = mint(store, "wl-a"), mint(store, "wl-b")
    key_a = joserfc_key(store.get("wl-a"))
    create_wpt(key_a, wit_a, ORIGIN + "/pay")
    with pytest.raises(WptMintError) as info:
        create_wpt(key_a, wit_b, ORIGIN + "/pay")
    assert info.value.code == "wpt_mint_wrong_key"
    wpt = create_wpt(joserfc_key(store.get("wl-b")), wit_b, ORIGIN + "/pay")
    claims = json.loads(b64url_decode_strict(wpt.split(".")[1]))
    assert claims["wth"] == token_hash(wit_b)


@pytest.mark.parametrize("wit", [None, 42, ["a.b.c"], b"a.b.c", "not-a-wit"])
def test_create_wpt_refuses_non_wits_with_its_own_error(store: MemoryKeyStore, wit: Any) -> None:
    with pytest.raises(WptMintError) as info:
        create_wpt(joserfc_key(store.get("wl-a")), wit, ORIGIN + "/pay")
    assert info.value.code == "wpt_mint_bad_wit"


def test_create_wpt_signer_key_custos_cannot_express(store: MemoryKeyStore) -> None:
    k1 = ECKey.import_key(ec.generate_private_key(ec.SECP256K1()))
    with pytest.raises(WptMintError) as info:
        create_wpt(k1, mint(store, "wl-a"), ORIGIN + "/pay")
    assert info.value.code == "wpt_mint_invalid"


def test_create_wpt_never_signs_with_another_scheme_than_the_device_keys() -> None:
    # An RS256 device key bound by a WIT that says PS256: the device refuses
    # to sign PSS (it is not quietly signed with the key's own scheme).
    s = MemoryKeyStore()
    s.create("issuer", "ES256")
    s.create("wl", "RS256")
    wit = mint_wit(
        joserfc_key(s.get("issuer")),
        "ES256",
        "issuer",
        SUB,
        {**public_jwk_members(s.public_key("wl")), "alg": "PS256"},
        timedelta(hours=1),
    )
    with pytest.raises(CustosError):
        create_wpt(joserfc_key(s.get("wl")), wit, ORIGIN + "/pay")


def test_verify_wit_still_checks_the_signature_of_each_token(
    store: MemoryKeyStore, bundles: BundleSet
) -> None:
    wit = mint(store, "wl-a")
    assert verify_wit(wit, bundles, now=NOW).token_hash == token_hash(wit)
    h, p, _ = wit.split(".")
    twin = secrets.token_bytes(64)
    with pytest.raises(WitError) as info:
        verify_wit(f"{h}.{p}.{b64(twin)}", bundles, now=NOW)
    assert info.value.code == "wit_bad_signature"
