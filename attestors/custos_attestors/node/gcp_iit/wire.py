"""The gcp_iit messages (small versioned JSON objects, bounded before parsing).

- agent -> server, payload: ``{"v": 1}`` (ready: send me an audience);
- server -> agent, challenge: ``{"v": 1, "audience": "<audience>/<nonce>"}``;
- agent -> server, answer: ``{"v": 1, "token": "<compact JWS>"}``.
"""

from __future__ import annotations

import json
import re

from custos.errors import CustosError

VERSION = 1
#: Google's identity tokens are about 1 KiB (format=full with licenses a bit more).
MAX_TOKEN_CHARS = 8192
MAX_MESSAGE_BYTES = 9216
MAX_AUDIENCE_CHARS = 256
_NONCE = re.compile(r"[A-Za-z0-9_-]{22,64}")
_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


class GcpIitEvidenceError(CustosError):
    """gcp_iit evidence is oversized, malformed, or of an unknown version."""

    code = "gcp_iit_evidence_invalid"


def _dump(message: dict[str, object]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def _load(data: object, keys: set[str], what: str) -> dict[str, object]:
    if not isinstance(data, bytes):
        raise GcpIitEvidenceError(f"the {what} must be bytes")
    if len(data) > MAX_MESSAGE_BYTES:
        raise GcpIitEvidenceError(f"the {what} is {len(data)} bytes; at most {MAX_MESSAGE_BYTES}")
    try:
        message = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise GcpIitEvidenceError(f"the {what} is not UTF-8 JSON") from None
    if not isinstance(message, dict) or set(message) != keys:
        raise GcpIitEvidenceError(f"the {what} must be a JSON object with {sorted(keys)}")
    version = message["v"]
    if type(version) is not int or version != VERSION:
        raise GcpIitEvidenceError(f"unsupported gcp_iit {what} version; this is {VERSION}")
    return message


def encode_hello() -> bytes:
    return _dump({"v": VERSION})


def decode_hello(data: object) -> None:
    _load(data, {"v"}, "payload")


def challenge_audience(audience: str, nonce: str) -> str:
    return f"{audience}/{nonce}"


def encode_challenge(audience: str) -> bytes:
    return _dump({"v": VERSION, "audience": audience})


def decode_challenge(data: object, expected_prefix: str) -> str:
    """The audience the server asks for: ``<expected_prefix>/<nonce>`` only (an agent
    mints no token for another relying party's audience)."""
    message = _load(data, {"v", "audience"}, "challenge")
    audience = message["audience"]
    prefix = expected_prefix + "/"
    if (
        not isinstance(audience, str)
        or len(audience) > MAX_AUDIENCE_CHARS
        or not audience.startswith(prefix)
        or not _NONCE.fullmatch(audience[len(prefix) :])
    ):
        raise GcpIitEvidenceError(
            f"the server asked for an audience other than {expected_prefix!r}/<nonce>"
        )
    return audience


def encode_token(token: str) -> bytes:
    check_token(token)
    return _dump({"v": VERSION, "token": token})


def check_token(token: object) -> str:
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS or not _JWS.fullmatch(token):
        raise GcpIitEvidenceError(
            f"the identity token must be a compact JWS of at most {MAX_TOKEN_CHARS} characters"
        )
    return token


def decode_token(data: object) -> str:
    return check_token(_load(data, {"v", "token"}, "answer")["token"])


def check_audience_prefix(value: object, name: str = "audience") -> str:
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= 128
        or not value.isascii()
        or not value.isprintable()
        or any(c in value for c in " &?#%")
    ):
        raise ValueError(
            f"{name} must be 1 to 128 printable ASCII characters without &?#% or space"
        )
    return value


__all__ = [
    "MAX_MESSAGE_BYTES",
    "MAX_TOKEN_CHARS",
    "VERSION",
    "GcpIitEvidenceError",
    "challenge_audience",
    "check_audience_prefix",
    "check_token",
    "decode_challenge",
    "decode_hello",
    "decode_token",
    "encode_challenge",
    "encode_hello",
    "encode_token",
]
