"""The one JWS signature check (RFC 7515 section 5.2, RFC 7518 encodings)."""

from __future__ import annotations

from typing import cast

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from custos._jose.algorithms import ALGORITHMS
from custos._jose.errors import JoseError
from custos._jose.jwk import key_fits_alg

_PKCS1 = padding.PKCS1v15()


def _pss(h: hashes.HashAlgorithm | None) -> padding.PSS:
    # RFC 7518 3.5: MGF1 with the same hash, salt as long as the hash.
    assert h is not None
    return padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size)


_PSS = {name: _pss(spec.hash) for name, spec in ALGORITHMS.items() if spec.padding == "pss"}
_ECDSA = {
    name: ec.ECDSA(spec.hash) for name, spec in ALGORITHMS.items() if spec.kty == "EC" and spec.hash
}


def _bad_signature() -> JoseError:
    return JoseError("signature is not valid", code="jose_bad_signature")


def verify_signature(key: object, alg: str, signing_input: bytes, signature: bytes) -> None:
    """Check the JWS ``signature`` over ``signing_input`` under exactly ``alg``.

    ``key`` is a cryptography public key that came through
    :func:`~custos._jose.import_public_jwk` or
    :func:`~custos._jose.check_public_key` (weak keys are refused there, once,
    not on every signature).  Raises :class:`JoseError` with
    ``jose_unsupported_alg`` (``alg`` not in the table),
    ``jose_key_alg_mismatch`` (wrong key type, curve or RSA size) or
    ``jose_bad_signature`` (wrong length, or does not verify); returns None
    when the signature is good.
    """
    spec = ALGORITHMS.get(alg) if isinstance(alg, str) else None
    if spec is None:
        raise JoseError("the algorithm is not supported", code="jose_unsupported_alg")
    # isinstance against the key ABCs costs ~0.3 us, under 1% of a verify.
    if not key_fits_alg(key, alg):
        raise JoseError(f"the key cannot verify {alg}", code="jose_key_alg_mismatch")
    if spec.signature_length is not None and len(signature) != spec.signature_length:
        raise _bad_signature()
    # key_fits_alg has just checked the key's type against spec.kty, so the
    # casts below restate that for mypy without a second isinstance per call.
    try:
        if spec.kty == "EC":
            half = len(signature) // 2
            der = encode_dss_signature(
                int.from_bytes(signature[:half], "big"), int.from_bytes(signature[half:], "big")
            )
            cast("ec.EllipticCurvePublicKey", key).verify(der, signing_input, _ECDSA[alg])
        elif spec.kty == "RSA":
            pad = _PKCS1 if spec.padding == "pkcs1" else _PSS[alg]
            hash_ = cast("hashes.HashAlgorithm", spec.hash)
            cast("rsa.RSAPublicKey", key).verify(signature, signing_input, pad, hash_)
        else:
            cast("ed25519.Ed25519PublicKey", key).verify(signature, signing_input)
    except (InvalidSignature, ValueError):
        raise _bad_signature() from None


__all__ = ["verify_signature"]
