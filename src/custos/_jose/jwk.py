"""The one import of public JWKs (RFC 7517 / 7518 section 6 / RFC 8037), and
the weak-key checks every verification key passes.

A confirmation key (``cnf.jwk``) chosen by the token's sender is attacker
input: a small-order Ed25519 point makes "a signature made with no key"
verify, and a key with two spellings (a non-canonical point, a zero-padded
modulus) gives one key two thumbprints.  So a key is accepted only in its one
exact RFC 7518 / RFC 8037 encoding and only if it is a key a signature can
depend on.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from custos._jose.algorithms import ALGORITHMS, MAX_RSA_BITS, MIN_RSA_BITS
from custos._jose.b64 import b64url_decode
from custos._jose.errors import JoseError

#: The public keys the core verifies with.
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey

#: RFC 7518 section 6 (and RFC 7517 ``oct``) members only private or symmetric
#: keys carry; a JWK with any of them is refused, never silently stripped.
PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "r", "t", "k")

#: JWK ``crv`` -> (cryptography curve, coordinate length in bytes, field prime).
_EC_CURVES: dict[str, tuple[ec.EllipticCurve, int, int]] = {
    "P-256": (ec.SECP256R1(), 32, 2**256 - 2**224 + 2**192 + 2**96 - 1),
    "P-384": (ec.SECP384R1(), 48, 2**384 - 2**128 - 2**96 + 2**32 - 1),
    "P-521": (ec.SECP521R1(), 66, 2**521 - 1),
}
_EC_CRV_BY_CURVE = {curve.name: crv for crv, (curve, _, _) in _EC_CURVES.items()}

_ED25519_P = 2**255 - 19
#: y of the two Ed25519 points of order 8 (the other two are their negatives,
#: same y, other sign bit); with y = 1 (identity), y = p - 1 (order 2) and
#: y = 0 (order 4) these are the y of all 8 small-order points.
_ED25519_Y_ORDER8 = 0x7A03AC9277FDC74EC6CC392CFA53202A0F67100D760B3CBA4FD84D3D706A17C7
_ED25519_SMALL_ORDER_Y = frozenset(
    {0, 1, _ED25519_P - 1, _ED25519_Y_ORDER8, _ED25519_P - _ED25519_Y_ORDER8}
)
#: Go's crypto/rsa limit; e = 65537 in practice, and a huge e is only work.
_MAX_RSA_EXPONENT = 2**31 - 1

#: How many distinct keys :func:`_key_from_members` remembers.
KEY_CACHE_SIZE = 1024


def _weak(message: str) -> JoseError:
    return JoseError(message, code="jose_key_weak")


def _member(jwk: Mapping[str, Any], name: str) -> str:
    value = jwk.get(name)
    if not isinstance(value, str) or not value:
        raise JoseError(f"JWK member {name!r} is missing or not a string", code="jose_key_invalid")
    return value


def _member_bytes(value: str, name: str) -> bytes:
    try:
        return b64url_decode(value)
    except ValueError:
        raise JoseError(f"JWK member {name!r} is not base64url", code="jose_key_invalid") from None


def _check_ed25519_bytes(raw: bytes) -> None:
    if len(raw) != 32:
        raise JoseError("Ed25519 key is not 32 bytes", code="jose_key_invalid")
    y = int.from_bytes(raw, "little") & ((1 << 255) - 1)
    if y >= _ED25519_P:
        raise _weak("Ed25519 key is a non-canonical point encoding (y >= p)")
    if y in _ED25519_SMALL_ORDER_Y:
        # Any "signature" R = that point, S = 0 verifies for every message.
        raise _weak("Ed25519 key is a small-order point")


def _check_rsa_numbers(n: int, e: int) -> None:
    bits = n.bit_length()
    if bits < MIN_RSA_BITS:
        raise _weak(f"RSA modulus has {bits} bits; at least {MIN_RSA_BITS} needed")
    if bits > MAX_RSA_BITS:
        raise _weak(f"RSA modulus has {bits} bits; at most {MAX_RSA_BITS} accepted")
    if e < 3 or e % 2 == 0 or e > _MAX_RSA_EXPONENT:
        raise _weak("RSA exponent must be odd, at least 3 and below 2^31")


@functools.lru_cache(maxsize=KEY_CACHE_SIZE)
def _key_from_members(kty: str, crv: str, a: str, b: str) -> PublicKey:
    """The public key for EC (crv, x=a, y=b), RSA (n=a, e=b) or OKP (crv, x=a).

    Remembered because building a key validates the point or modulus (a fifth
    of a WIT check) and a relying party sees the same few keys again and
    again.  Safe to share: the result is an immutable function of exactly
    these strings (nothing is canonicalised before the lookup), the cache is
    bounded, and errors are not cached.
    """
    if kty == "EC":
        curve, size, prime = _EC_CURVES[crv]
        xb, yb = _member_bytes(a, "x"), _member_bytes(b, "y")
        if len(xb) != size or len(yb) != size:
            # RFC 7518 6.2.1.2: exactly the coordinate size, leading zeros kept.
            raise _weak(f"{crv} coordinates must be exactly {size} bytes")
        x, y = int.from_bytes(xb, "big"), int.from_bytes(yb, "big")
        if x >= prime or y >= prime:
            # OpenSSL reduces them mod p: a second spelling of another key.
            raise _weak(f"{crv} coordinates must be below the field prime")
        try:
            return ec.EllipticCurvePublicNumbers(x, y, curve).public_key()
        except ValueError:
            raise JoseError(f"the point is not on {crv}", code="jose_key_invalid") from None
    if kty == "RSA":
        nb, eb = _member_bytes(a, "n"), _member_bytes(b, "e")
        if nb[0] == 0 or eb[0] == 0:
            # RFC 7518 6.3.1.1: the minimal octet string, no leading zero octet.
            raise _weak("RSA n and e must have no leading zero octet")
        n, e = int.from_bytes(nb, "big"), int.from_bytes(eb, "big")
        _check_rsa_numbers(n, e)
        try:
            return rsa.RSAPublicNumbers(e, n).public_key()
        except ValueError:
            raise JoseError("not a valid RSA public key", code="jose_key_invalid") from None
    raw = _member_bytes(a, "x")
    _check_ed25519_bytes(raw)
    try:
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:  # pragma: no cover - 32 bytes always load
        raise JoseError("not a valid Ed25519 key", code="jose_key_invalid") from None


def key_fits_alg(key: object, alg: str) -> bool:
    """Whether the public ``key`` can verify ``alg`` (type, curve, RSA size)."""
    spec = ALGORITHMS.get(alg) if isinstance(alg, str) else None
    if spec is None:
        return False
    if spec.kty == "EC":
        return (
            isinstance(key, ec.EllipticCurvePublicKey)
            and _EC_CRV_BY_CURVE.get(key.curve.name) == spec.crv
        )
    if spec.kty == "RSA":
        return isinstance(key, rsa.RSAPublicKey) and MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS
    return isinstance(key, ed25519.Ed25519PublicKey)


def _check_alg(key: PublicKey, alg: str | None) -> None:
    if alg is None:
        return
    if alg not in ALGORITHMS:
        raise JoseError("the algorithm is not supported", code="jose_unsupported_alg")
    if not key_fits_alg(key, alg):
        raise JoseError(f"the key cannot verify {alg}", code="jose_key_alg_mismatch")


def import_public_jwk(jwk: Mapping[str, Any], *, alg: str | None = None) -> PublicKey:
    """The cryptography public key of the public JWK ``jwk``, or :class:`JoseError`.

    Accepted: ``kty`` EC (P-256, P-384, P-521), RSA, OKP (Ed25519), each in its
    exact RFC 7518 / 8037 encoding.  Refused (code): private or symmetric
    members (``jose_key_private``); unknown ``kty`` / ``crv``
    (``jose_key_unsupported``); missing or non-base64url members, a point not
    on the curve (``jose_key_invalid``); EC coordinates not exactly the curve
    size or not below p, RSA ``n`` / ``e`` with a leading zero octet, a modulus
    under 2048 or over 16384 bits, an even, < 3 or >= 2^31 exponent, a
    small-order or non-canonical Ed25519 point (``jose_key_weak``).

    ``alg``, when given, is the algorithm the key will verify: it must be in
    :data:`ALGORITHMS` and fit the key (``jose_unsupported_alg`` /
    ``jose_key_alg_mismatch``), and a JWK ``alg`` member must equal it.
    Other members (``kid``, ``use``, ``key_ops`` ...) are the caller's to judge.
    """
    if not isinstance(jwk, Mapping):
        raise JoseError("a JWK must be a JSON object", code="jose_key_invalid")
    if not jwk.keys().isdisjoint(PRIVATE_MEMBERS):
        raise JoseError("the JWK holds private or symmetric key material", code="jose_key_private")
    kty = jwk.get("kty")
    if kty == "EC":
        crv = jwk.get("crv")
        if not isinstance(crv, str) or crv not in _EC_CURVES:
            raise JoseError("unsupported EC curve", code="jose_key_unsupported")
        key = _key_from_members("EC", crv, _member(jwk, "x"), _member(jwk, "y"))
    elif kty == "RSA":
        key = _key_from_members("RSA", "", _member(jwk, "n"), _member(jwk, "e"))
    elif kty == "OKP":
        if jwk.get("crv") != "Ed25519":
            raise JoseError("unsupported OKP curve", code="jose_key_unsupported")
        key = _key_from_members("OKP", "Ed25519", _member(jwk, "x"), "")
    else:
        raise JoseError("unsupported key type", code="jose_key_unsupported")
    if alg is not None:
        own = jwk.get("alg")
        if own is not None and own != alg:
            raise JoseError(
                "the JWK's alg differs from the algorithm used", code="jose_key_alg_mismatch"
            )
    _check_alg(key, alg)
    return key


def check_public_key(key: object, *, alg: str | None = None) -> PublicKey:
    """Apply :func:`import_public_jwk`'s rules to a cryptography public key.

    For keys that arrive as objects (a bundle authority, a signing key's
    public half, an HTTP-signature key): the same refusals, same codes, so a
    weak key is refused whichever way it came in.  Returns ``key``.
    """
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in _EC_CRV_BY_CURVE:
            raise JoseError("unsupported EC curve", code="jose_key_unsupported")
    elif isinstance(key, rsa.RSAPublicKey):
        numbers = key.public_numbers()
        _check_rsa_numbers(numbers.n, numbers.e)
    elif isinstance(key, ed25519.Ed25519PublicKey):
        _check_ed25519_bytes(key.public_bytes(Encoding.Raw, PublicFormat.Raw))
    else:
        raise JoseError(
            f"unsupported public key type {type(key).__name__}", code="jose_key_unsupported"
        )
    _check_alg(key, alg)
    return key


__all__ = [
    "KEY_CACHE_SIZE",
    "PRIVATE_MEMBERS",
    "PublicKey",
    "check_public_key",
    "import_public_jwk",
    "key_fits_alg",
]
