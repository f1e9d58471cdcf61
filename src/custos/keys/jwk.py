"""Public keys as JWKs (RFC 7517), with an RFC 7638 thumbprint as ``kid``."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from custos.keys.algorithms import Algorithm
from custos.keys.errors import UnsupportedAlgorithmError


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _int_bytes(n: int, size: int | None = None) -> bytes:
    return n.to_bytes(size if size is not None else max(1, (n.bit_length() + 7) // 8), "big")


def public_jwk_members(key: PublicKeyTypes) -> dict[str, str]:
    """The required members of a public JWK, no optional ones."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        size = (key.curve.key_size + 7) // 8
        crv = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}.get(key.curve.name)
        if crv is None:
            raise UnsupportedAlgorithmError(f"unsupported curve {key.curve.name}")
        nums = key.public_numbers()
        return {
            "kty": "EC",
            "crv": crv,
            "x": b64url(_int_bytes(nums.x, size)),
            "y": b64url(_int_bytes(nums.y, size)),
        }
    if isinstance(key, ed25519.Ed25519PublicKey):
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
        return {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)}
    if isinstance(key, rsa.RSAPublicKey):
        rsa_nums = key.public_numbers()
        return {
            "kty": "RSA",
            "n": b64url(_int_bytes(rsa_nums.n)),
            "e": b64url(_int_bytes(rsa_nums.e)),
        }
    raise UnsupportedAlgorithmError(f"unsupported public key type {type(key).__name__}")


def thumbprint(key: PublicKeyTypes) -> str:
    """RFC 7638 SHA-256 JWK thumbprint, base64url."""
    members = public_jwk_members(key)
    canonical = json.dumps(members, sort_keys=True, separators=(",", ":")).encode()
    return b64url(hashlib.sha256(canonical).digest())


def public_jwk(key: PublicKeyTypes, alg: Algorithm | None = None) -> dict[str, Any]:
    jwk: dict[str, Any] = dict(public_jwk_members(key))
    if alg is not None:
        jwk["alg"] = alg.value
    jwk["kid"] = thumbprint(key)
    return jwk
