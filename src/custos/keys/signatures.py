"""Conversions between the signature encodings devices, JOSE and X.509 use.

TPMs hand back ECDSA ``r`` and ``s`` separately, PKCS#11 returns raw ``r||s``,
``cryptography`` and X.509 want DER.  custos keys speak JOSE (raw ``r||s``) and
convert here, once.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from custos.keys.errors import KeyStoreError


def raw_to_der(raw: bytes, coordinate_size: int) -> bytes:
    if len(raw) != 2 * coordinate_size:
        raise KeyStoreError(
            f"ECDSA signature has {len(raw)} bytes, expected {2 * coordinate_size}",
            code="bad_signature_encoding",
        )
    r = int.from_bytes(raw[:coordinate_size], "big")
    s = int.from_bytes(raw[coordinate_size:], "big")
    return encode_dss_signature(r, s)


def der_to_raw(der: bytes, coordinate_size: int) -> bytes:
    try:
        r, s = decode_dss_signature(der)
    except ValueError as e:
        raise KeyStoreError("malformed DER ECDSA signature", code="bad_signature_encoding") from e
    return rs_to_raw(r, s, coordinate_size)


def rs_to_raw(r: int, s: int, coordinate_size: int) -> bytes:
    return r.to_bytes(coordinate_size, "big") + s.to_bytes(coordinate_size, "big")
