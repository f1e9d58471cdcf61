"""The one table of JWS signature algorithms custos verifies (RFC 7518, RFC 8037).

Only asymmetric algorithms: ``none`` and ``HS*`` are absent, so no caller can
enable them by listing them, and no "HMAC keyed with the public key" exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from cryptography.hazmat.primitives import hashes

KeyType = Literal["EC", "RSA", "OKP"]

#: RSA moduli below this are refused everywhere (RFC 7518 section 3.3 says 2048).
MIN_RSA_BITS = 2048
#: Above OpenSSL's own limit; bounds the work a hostile key can cause.
MAX_RSA_BITS = 16384


@dataclass(frozen=True)
class Algorithm:
    """One JWS algorithm: what key it needs and how its signature looks."""

    name: str
    kty: KeyType
    #: JWK ``crv`` of the key (``None`` for RSA: any modulus of MIN..MAX bits)
    crv: str | None
    #: the hash signed over (``None`` for EdDSA, which hashes internally)
    hash: hashes.HashAlgorithm | None
    #: exact signature length in bytes (``None`` for RSA: the modulus length)
    signature_length: int | None
    #: RSA padding: PKCS#1 v1.5 (RS*) or PSS (PS*); ``None`` otherwise
    padding: Literal["pkcs1", "pss"] | None = None


def _table() -> dict[str, Algorithm]:
    sha = {256: hashes.SHA256(), 384: hashes.SHA384(), 512: hashes.SHA512()}
    table: dict[str, Algorithm] = {}
    for bits, crv, size in ((256, "P-256", 32), (384, "P-384", 48), (512, "P-521", 66)):
        table[f"ES{bits}"] = Algorithm(f"ES{bits}", "EC", crv, sha[bits], 2 * size)
        table[f"RS{bits}"] = Algorithm(f"RS{bits}", "RSA", None, sha[bits], None, "pkcs1")
        table[f"PS{bits}"] = Algorithm(f"PS{bits}", "RSA", None, sha[bits], None, "pss")
    table["EdDSA"] = Algorithm("EdDSA", "OKP", "Ed25519", None, 64)
    return table


#: name -> :class:`Algorithm`, read-only.
ALGORITHMS: MappingProxyType[str, Algorithm] = MappingProxyType(_table())
#: Every name in :data:`ALGORITHMS`.
ASYMMETRIC_ALGORITHMS: frozenset[str] = frozenset(ALGORITHMS)
#: What SPIFFE allows for JWT-SVIDs and WIT-SVIDs: RS*, ES*, PS* (no EdDSA).
SPIFFE_ALGORITHMS: frozenset[str] = ASYMMETRIC_ALGORITHMS - {"EdDSA"}

__all__ = [
    "ALGORITHMS",
    "ASYMMETRIC_ALGORITHMS",
    "MAX_RSA_BITS",
    "MIN_RSA_BITS",
    "SPIFFE_ALGORITHMS",
    "Algorithm",
    "KeyType",
]
