"""The azure_msi evidence: ``{"v": 1, "token": "<JWT>"}`` (SPIRE sends ``{"token": ...}``).

Decoding is bounded before parsing; no error repeats the token (it is a bearer token
for the configured resource).
"""

from __future__ import annotations

import json
import re

from custos.errors import CustosError

VERSION = 1
#: Azure AD access tokens are 1-3 KB; 16 KiB leaves room for large group claims.
MAX_TOKEN_CHARS = 16 * 1024
MAX_MESSAGE_BYTES = MAX_TOKEN_CHARS + 64
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


class AzureMsiEvidenceError(CustosError):
    """azure_msi evidence is oversized, not the JSON object we expect, or not a JWT."""

    code = "azure_msi_evidence_invalid"


def check_token(token: object) -> str:
    """``token`` if it looks like a compact JWS (three base64url parts, bounded)."""
    if (
        not isinstance(token, str)
        or not 0 < len(token) <= MAX_TOKEN_CHARS
        or not _COMPACT_JWS.fullmatch(token)
    ):
        raise AzureMsiEvidenceError(
            f"the managed-identity token must be a compact JWT of at most {MAX_TOKEN_CHARS} "
            "characters"
        )
    return token


def encode(token: str) -> bytes:
    return json.dumps({"v": VERSION, "token": check_token(token)}, separators=(",", ":")).encode()


def decode(payload: object) -> str:
    if not isinstance(payload, bytes):
        raise AzureMsiEvidenceError("azure_msi evidence must be bytes")
    if len(payload) > MAX_MESSAGE_BYTES:
        raise AzureMsiEvidenceError(
            f"azure_msi evidence is {len(payload)} bytes; at most {MAX_MESSAGE_BYTES}"
        )
    try:
        message = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise AzureMsiEvidenceError("azure_msi evidence is not UTF-8 JSON") from None
    if not isinstance(message, dict) or set(message) != {"v", "token"}:
        raise AzureMsiEvidenceError('azure_msi evidence must be {"v": 1, "token": "..."}')
    if type(message["v"]) is not int or message["v"] != VERSION:
        raise AzureMsiEvidenceError(f"unsupported azure_msi evidence version; this is {VERSION}")
    return check_token(message["token"])


__all__ = [
    "MAX_MESSAGE_BYTES",
    "MAX_TOKEN_CHARS",
    "AzureMsiEvidenceError",
    "check_token",
    "decode",
    "encode",
]
