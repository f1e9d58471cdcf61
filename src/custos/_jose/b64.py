"""Strict base64url (RFC 7515 section 2, RFC 4648 section 5 without padding)."""

from __future__ import annotations

import base64
import binascii

#: url-safe -> standard alphabet; "+", "/" and "=" become "!", which strict
#: base64 decoding refuses like any other character outside the alphabet.
_B64URL_TO_STD = bytes.maketrans(b"-_+/=", b"+/!!!")
_PAD = (b"", b"", b"==", b"=")
#: The last character of canonical base64url when len % 4 is 2 (4 unused bits)
#: or 3 (2 unused bits): only characters whose unused bits are zero.
_CANONICAL_LAST = {2: frozenset("AQgw"), 3: frozenset("AEIMQUYcgkosw048")}


def b64url_encode(data: bytes) -> str:
    """Unpadded base64url of ``data``."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(value: str) -> bytes:
    """Decode unpadded base64url, refusing anything non-canonical (ValueError).

    Refused: padding, whitespace, characters outside the url-safe alphabet,
    non-ASCII, a length of 1 mod 4, and stray low bits in the last character.
    Non-canonical input would decode to the same bytes as the canonical form,
    so two strings would carry one signature: each value has one spelling.

    The canonical check looks at the last character only (its unused low bits
    must be zero) instead of re-encoding the result: same verdict, cheaper.
    """
    rem = len(value) % 4
    if rem == 1:
        raise ValueError("not base64url")
    if rem and value[-1] not in _CANONICAL_LAST[rem]:
        raise ValueError("non-canonical base64url")
    # One translation turns the url-safe alphabet into the standard one and
    # every character outside it ("+", "/", "=") into one that strict mode
    # refuses; non-ASCII input fails the encode (UnicodeEncodeError is a
    # ValueError).
    return binascii.a2b_base64(
        value.encode("ascii").translate(_B64URL_TO_STD) + _PAD[rem], strict_mode=True
    )


__all__ = ["b64url_decode", "b64url_encode"]
