"""The one strict compact-JWS decoder (RFC 7515 section 7.1)."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

from custos._jose.b64 import b64url_decode
from custos._jose.errors import JoseError
from custos._jose.strict_json import loads_strict


class CompactJws(NamedTuple):
    """A compact JWS split and strictly decoded; its signature NOT yet checked.

    An immutable named tuple rather than a frozen dataclass: one is built per
    token on every request, and a tuple is built in a third of the time
    (the frozen dataclass sets each field through ``object.__setattr__``).
    """

    #: the JOSE header (a private copy: callers may keep or change it)
    header: dict[str, Any]
    #: the decoded payload bytes
    payload: bytes
    #: the payload as a JSON object (every JWS custos reads is a JWT)
    claims: dict[str, Any]
    #: ASCII ``<header>.<payload>``: what the signature covers
    signing_input: bytes
    #: the decoded signature
    signature: bytes


def _malformed(message: str) -> JoseError:
    return JoseError(message, code="jose_malformed")


#: Longest header part (characters) whose decode is remembered.
_MAX_CACHED_HEADER = 512


@functools.lru_cache(maxsize=256)
def _flat_header(part: str) -> dict[str, Any] | None:
    """The decoded JOSE header ``part`` if all its values are strings, else None.

    A sender's header is the same few bytes on every token (``alg``, ``typ``,
    ``kid``), so its decode is remembered.  Only flat headers are kept, so the
    caller's shallow copy shares nothing mutable with the cache; errors are
    not cached (they raise through lru_cache).
    """
    header = loads_strict(b64url_decode(part))
    return header if all(type(v) is str for v in header.values()) else None


def decode_compact(token: object, *, max_length: int) -> CompactJws:
    """Split and decode the compact JWS ``token`` (no signature check).

    Refused with :class:`JoseError`: a non-``str`` token, or one with non-ASCII
    characters (``jose_malformed``); one longer than ``max_length`` characters
    (``jose_too_large``, checked before any other work); not exactly three
    parts, any part not strict base64url (:func:`~custos._jose.b64url_decode`),
    header or payload not one strict JSON object (:func:`~custos._jose.loads_strict`),
    or a ``crit`` header — custos understands no
    extension, so any ``crit`` is fatal (RFC 7515 4.1.11) (``jose_malformed``).
    """
    if not isinstance(token, str):
        raise _malformed("token is not a string")
    if len(token) > max_length:
        raise JoseError(f"token is longer than {max_length} characters", code="jose_too_large")
    parts = token.split(".")
    if len(parts) != 3:
        raise _malformed("token is not a compact JWS (three parts)")
    head, body, sig = parts
    try:
        # Only short headers are remembered, so hostile input cannot fill the
        # cache with large entries (real headers are about 100 characters).
        flat = _flat_header(head) if len(head) <= _MAX_CACHED_HEADER else None
        header = dict(flat) if flat is not None else loads_strict(b64url_decode(head))
        payload = b64url_decode(body)
        claims = loads_strict(payload)
        signature = b64url_decode(sig)
    except ValueError:  # UnicodeError is a ValueError
        # "from None": the decode error may quote bytes of the token.
        raise _malformed("token is not base64url-encoded strict JSON") from None
    if "crit" in header:
        raise _malformed("token has critical header parameters")
    return CompactJws(header, payload, claims, f"{head}.{body}".encode("ascii"), signature)


__all__ = ["CompactJws", "decode_compact"]
