"""The join-token evidence: a small, versioned JSON object ``{"v": 1, "token": "..."}``.

Decoding is the server's first contact with hostile bytes, so it is bounded
before parsing, and no error message repeats any part of the input: the input
may be a real secret sent to the wrong place.
"""

from __future__ import annotations

import json

from custos.errors import CustosError

VERSION = 1
#: A token we issue is 43 characters; the datastore accepts up to 256.
MAX_TOKEN_CHARS = 256
#: Larger than any well-formed message (the token plus a few bytes of JSON).
MAX_MESSAGE_BYTES = 1024


class JoinTokenEvidenceError(CustosError):
    """Join-token evidence is oversized, not the JSON object we expect, or of an
    unknown version."""

    code = "join_token_evidence_invalid"


def encode(token: str) -> bytes:
    """The payload carrying ``token``."""
    check_token(token)
    return json.dumps({"v": VERSION, "token": token}, separators=(",", ":")).encode()


def check_token(token: object) -> str:
    """``token`` if it can be a join token secret (printable ASCII, 1..256 chars)."""
    if (
        not isinstance(token, str)
        or not 0 < len(token) <= MAX_TOKEN_CHARS
        or not token.isascii()
        or not token.isprintable()
        or token != token.strip()
    ):
        raise JoinTokenEvidenceError(
            f"a join token is 1 to {MAX_TOKEN_CHARS} printable ASCII characters"
        )
    return token


def decode(payload: object) -> str:
    """The token secret in ``payload``; :class:`JoinTokenEvidenceError` otherwise."""
    if not isinstance(payload, bytes):
        raise JoinTokenEvidenceError("join token evidence must be bytes")
    if len(payload) > MAX_MESSAGE_BYTES:
        raise JoinTokenEvidenceError(
            f"join token evidence is {len(payload)} bytes; at most {MAX_MESSAGE_BYTES}"
        )
    try:
        message = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise JoinTokenEvidenceError("join token evidence is not UTF-8 JSON") from None
    if not isinstance(message, dict) or set(message) != {"v", "token"}:
        raise JoinTokenEvidenceError('join token evidence must be {"v": 1, "token": "..."}')
    version = message["v"]
    if type(version) is not int or version != VERSION:
        raise JoinTokenEvidenceError(f"unsupported join token evidence version; this is {VERSION}")
    return check_token(message["token"])


__all__ = [
    "MAX_MESSAGE_BYTES",
    "VERSION",
    "JoinTokenEvidenceError",
    "check_token",
    "decode",
    "encode",
]
