"""Weak and non-canonical public keys (issue 7, item 7), the algorithm table
and the signature check of custos._jose.

The precondition tests show each refused key is one that ``cryptography`` (and
so any verifier without these checks) takes as it is.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from joserfc import jws
from joserfc.jwk import ECKey, OKPKey, RSAKey

from custos._jose import (
    ALGORITHMS,
    ASYMMETRIC_ALGORITHMS,
    SPIFFE_ALGORITHMS,
    JoseError,
    b64url_decode,
    b64url_encode,
    check_public_key,
    decode_compact,
    import_public_jwk,
    key_fits_alg,
    verify_signature,
)
from custos.keys.jwk import public_jwk_members

ED25519_P = 2**255 - 19
_ORDER8_A = "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"
_ORDER8_B = "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"


def _le(y: int, sign: int = 0) -> bytes:
    return (y | (sign << 255)).to_bytes(32, "little")


#: The 8 small-order Ed25519 points (libsodium's blocklist) plus the
#: sign-bit variants of x = 0 points (not canonical either).
SMALL_ORDER = {
    "identity": _le(1),
    "identity, sign bit": _le(1, 1),
    "order 2": _le(ED25519_P - 1),
    "order 2, sign bit": _le(ED25519_P - 1, 1),
    "order 4": _le(0),
    "order 4, other x": _le(0, 1),
    "order 8 a": bytes.fromhex(_ORDER8_A),
    "order 8 a, other x": bytes.fromhex(_ORDER8_A[:-2] + "fa"),
    "order 8 b": bytes.fromhex(_ORDER8_B),
    "order 8 b, other x": bytes.fromhex(_ORDER8_B[:-2] + "85"),
}
#: y >= p: non-canonical encodings (of y - p, for the small ones).
NON_CANONICAL = {
    "y = p (encodes y = 0)": _le(ED25519_P),
    "y = p + 1 (encodes the identity)": _le(ED25519_P + 1),
    "y = 2^255 - 1": _le(2**255 - 1),
}


def _okp(raw: bytes) -> dict[str, Any]:
    return {"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(raw)}


def _code(jwk: Any, **kw: Any) -> str:
    with pytest.raises(JoseError) as info:
        import_public_jwk(jwk, **kw)
    return info.value.code


# -- Ed25519 -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SMALL_ORDER))
def test_small_order_ed25519_points_refused(name: str) -> None:
    assert _code(_okp(SMALL_ORDER[name])) == "jose_key_weak"


@pytest.mark.parametrize("name", sorted(NON_CANONICAL))
def test_non_canonical_ed25519_points_refused(name: str) -> None:
    assert _code(_okp(NON_CANONICAL[name])) == "jose_key_weak"


def test_a_signature_made_with_no_key_is_refused_end_to_end() -> None:
    """Item 7: with the identity as cnf key, R = identity and S = 0 verify any message."""
    identity = SMALL_ORDER["identity"]
    header = b64url_encode(json.dumps({"alg": "EdDSA", "typ": "wit+jwt"}).encode())
    claims = b64url_encode(json.dumps({"sub": "spiffe://example.org/w"}).encode())
    forged = f"{header}.{claims}.{b64url_encode(identity + bytes(32))}"
    token = decode_compact(forged, max_length=8192)
    # Precondition: cryptography verifies the forgery with that point.
    ed25519.Ed25519PublicKey.from_public_bytes(identity).verify(
        token.signature, token.signing_input
    )
    with pytest.raises(JoseError) as info:
        key = import_public_jwk(_okp(identity), alg="EdDSA")
        verify_signature(key, "EdDSA", token.signing_input, token.signature)
    assert info.value.code == "jose_key_weak"
    with pytest.raises(JoseError) as info:
        check_public_key(ed25519.Ed25519PublicKey.from_public_bytes(identity))
    assert info.value.code == "jose_key_weak"


def test_real_ed25519_key_accepted() -> None:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    jwk = public_jwk_members(key)
    assert import_public_jwk(jwk, alg="EdDSA") == key
    assert check_public_key(key, alg="EdDSA") is key


@pytest.mark.parametrize("raw", [bytes(31), bytes(33)])
def test_ed25519_wrong_length_refused(raw: bytes) -> None:
    assert _code(_okp(raw)) == "jose_key_invalid"


# -- EC -----------------------------------------------------------------------------

_P521 = 2**521 - 1


def _ec_jwk(curve: ec.EllipticCurve) -> tuple[ec.EllipticCurvePublicKey, dict[str, Any]]:
    key = ec.generate_private_key(curve).public_key()
    return key, dict(public_jwk_members(key))


def _with_small_x(curve: ec.EllipticCurve) -> tuple[ec.EllipticCurvePublicKey, dict[str, Any]]:
    """A key whose x has a leading zero octet (about 1 in 256 keys)."""
    while True:
        key, jwk = _ec_jwk(curve)
        if b64url_decode(jwk["x"])[0] == 0:
            return key, jwk


def test_ec_keys_accepted_for_each_curve() -> None:
    for curve, alg in (
        (ec.SECP256R1(), "ES256"),
        (ec.SECP384R1(), "ES384"),
        (ec.SECP521R1(), "ES512"),
    ):
        key, jwk = _ec_jwk(curve)
        assert import_public_jwk(jwk, alg=alg) == key


def test_ec_coordinates_keep_leading_zeros() -> None:
    key, jwk = _with_small_x(ec.SECP256R1())
    assert import_public_jwk(jwk) == key  # the fixed-length form is the right one
    stripped = dict(jwk, x=b64url_encode(b64url_decode(jwk["x"])[1:]))
    # Precondition: the stripped form is the same point for cryptography.
    x = int.from_bytes(b64url_decode(stripped["x"]), "big")
    assert (
        ec.EllipticCurvePublicNumbers(x, key.public_numbers().y, ec.SECP256R1()).public_key() == key
    )
    assert _code(stripped) == "jose_key_weak"


@pytest.mark.parametrize("member", ["x", "y"])
def test_ec_coordinate_with_extra_zero_octet_refused(member: str) -> None:
    _, jwk = _ec_jwk(ec.SECP384R1())
    padded = dict(jwk, **{member: b64url_encode(b"\x00" + b64url_decode(jwk[member]))})
    assert _code(padded) == "jose_key_weak"


def test_ec_coordinate_at_or_above_p_refused() -> None:
    key, jwk = _ec_jwk(ec.SECP521R1())
    nums = key.public_numbers()
    alias = nums.x + _P521  # fits in 66 bytes: a second spelling of the same point
    # Precondition: OpenSSL reduces it and returns the same key.
    assert ec.EllipticCurvePublicNumbers(alias, nums.y, ec.SECP521R1()).public_key() == key
    bad = dict(jwk, x=b64url_encode(alias.to_bytes(66, "big")))
    assert _code(bad) == "jose_key_weak"


def test_ec_point_not_on_curve_refused() -> None:
    _, jwk = _ec_jwk(ec.SECP256R1())
    y = b64url_decode(jwk["y"])
    bad = dict(jwk, y=b64url_encode(y[:-1] + bytes([y[-1] ^ 1])))
    assert _code(bad) == "jose_key_invalid"


# -- RSA -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPublicKey:
    return rsa.generate_private_key(65537, 2048).public_key()


def test_rsa_key_accepted(rsa_key: rsa.RSAPublicKey) -> None:
    for alg in ("RS256", "PS512"):
        assert import_public_jwk(public_jwk_members(rsa_key), alg=alg) == rsa_key


@pytest.mark.parametrize("member", ["n", "e"])
def test_rsa_leading_zero_octet_refused(rsa_key: rsa.RSAPublicKey, member: str) -> None:
    jwk = dict(public_jwk_members(rsa_key))
    jwk[member] = b64url_encode(b"\x00" + b64url_decode(jwk[member]))
    assert _code(jwk) == "jose_key_weak"


def test_rsa_small_modulus_refused() -> None:
    small = rsa.generate_private_key(65537, 1024).public_key()
    assert _code(public_jwk_members(small)) == "jose_key_weak"
    with pytest.raises(JoseError):
        check_public_key(small)


@pytest.mark.parametrize("e", [1, 2, 4, 65536, 2**31 + 1])
def test_rsa_bad_exponent_refused(rsa_key: rsa.RSAPublicKey, e: int) -> None:
    jwk = dict(public_jwk_members(rsa_key))
    jwk["e"] = b64url_encode(e.to_bytes((e.bit_length() + 7) // 8, "big"))
    assert _code(jwk) == "jose_key_weak"


# -- private members, unsupported, malformed -------------------------------------------


@pytest.mark.parametrize("member", ["d", "p", "q", "dp", "dq", "qi", "oth", "k"])
def test_private_members_refused(member: str) -> None:
    _, jwk = _ec_jwk(ec.SECP256R1())
    assert _code(dict(jwk, **{member: "AQAB"})) == "jose_key_private"


def test_private_okp_jwk_refused() -> None:
    priv = OKPKey.generate_key("Ed25519").as_dict(private=True)
    assert _code(priv) == "jose_key_private"


@pytest.mark.parametrize(
    "jwk",
    [
        {"kty": "oct"},
        {"kty": "EC", "crv": "P-999", "x": "AA", "y": "AA"},
        {"kty": "EC", "crv": "secp256k1", "x": "AA", "y": "AA"},
        {"kty": "OKP", "crv": "X25519", "x": "AA"},
        {"kty": "OKP", "crv": "Ed448", "x": "AA"},
        {},
    ],
)
def test_unsupported_keys(jwk: dict[str, Any]) -> None:
    assert _code(jwk) in ("jose_key_unsupported", "jose_key_private")


@pytest.mark.parametrize(
    "jwk",
    [
        {"kty": "EC", "crv": "P-256", "x": ["AA"], "y": "AA"},
        {"kty": "EC", "crv": "P-256", "y": "AA"},
        {"kty": "RSA", "n": "AQ==", "e": "AQAB"},
        {"kty": "OKP", "crv": "Ed25519", "x": ""},
        {"kty": "OKP", "crv": "Ed25519", "x": {"a": 1}},
    ],
)
def test_malformed_members(jwk: dict[str, Any]) -> None:
    assert _code(jwk) == "jose_key_invalid"


def test_not_a_mapping() -> None:
    assert _code(["kty", "EC"]) == "jose_key_invalid"


def test_alg_must_fit_key_and_member() -> None:
    key, jwk = _ec_jwk(ec.SECP256R1())
    assert _code(jwk, alg="ES384") == "jose_key_alg_mismatch"
    assert _code(jwk, alg="RS256") == "jose_key_alg_mismatch"
    assert _code(dict(jwk, alg="ES384"), alg="ES256") == "jose_key_alg_mismatch"
    assert _code(jwk, alg="HS256") == "jose_unsupported_alg"
    assert _code(jwk, alg="none") == "jose_unsupported_alg"
    assert import_public_jwk(dict(jwk, alg="ES256", kid="k", use="sig"), alg="ES256") == key


# -- algorithm table and signatures -------------------------------------------------------


def test_table() -> None:
    assert ASYMMETRIC_ALGORITHMS == {
        "ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA",
    }  # fmt: skip
    assert SPIFFE_ALGORITHMS == ASYMMETRIC_ALGORITHMS - {"EdDSA"}
    assert ALGORITHMS["ES512"].crv == "P-521" and ALGORITHMS["ES512"].signature_length == 132
    assert ALGORITHMS["PS384"].padding == "pss" and ALGORITHMS["RS384"].padding == "pkcs1"
    assert "none" not in ALGORITHMS and "HS256" not in ALGORITHMS


_KEYS = {
    "ES256": lambda: ECKey.generate_key("P-256"),
    "ES384": lambda: ECKey.generate_key("P-384"),
    "ES512": lambda: ECKey.generate_key("P-521"),
    "RS256": lambda: RSAKey.generate_key(2048),
    "PS256": lambda: RSAKey.generate_key(2048),
    "PS512": lambda: RSAKey.generate_key(2048),
    "EdDSA": lambda: OKPKey.generate_key("Ed25519"),
}


@pytest.mark.parametrize("alg", sorted(_KEYS))
def test_verify_signature_matches_joserfc(alg: str) -> None:
    private = _KEYS[alg]()
    token = jws.serialize_compact({"alg": alg}, b'{"a":1}', private, algorithms=[alg])
    parts = decode_compact(token, max_length=8192)
    public = import_public_jwk(private.as_dict(private=False), alg=alg)
    verify_signature(public, alg, parts.signing_input, parts.signature)
    tampered = parts.signing_input[:-1] + b"x"
    with pytest.raises(JoseError) as info:
        verify_signature(public, alg, tampered, parts.signature)
    assert info.value.code == "jose_bad_signature"
    for signature in (parts.signature + b"\x00", b""):
        with pytest.raises(JoseError) as info:
            verify_signature(public, alg, parts.signing_input, signature)
        assert info.value.code == "jose_bad_signature"


def test_verify_signature_refuses_wrong_key_or_alg() -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    cases = {
        "ES384": "jose_key_alg_mismatch",
        "RS256": "jose_key_alg_mismatch",
        "HS256": "jose_unsupported_alg",
        "none": "jose_unsupported_alg",
    }
    for alg, code in cases.items():
        with pytest.raises(JoseError) as info:
            verify_signature(key, alg, b"x", b"\x00" * 64)
        assert info.value.code == code
    assert key_fits_alg(key, "ES256") and not key_fits_alg(key, "EdDSA")
    assert not key_fits_alg("not a key", "ES256")
