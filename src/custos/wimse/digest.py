"""RFC 9530 ``Content-Digest``: create it for a body, check it against a body.

The field is a Structured Field Dictionary (``sha-256=:<base64>:``) handled by
http-sfv; the hashing is hashlib. Only ``sha-256`` and ``sha-512`` count:
RFC 9530 marks ``md5``, ``sha``, ``unixsum`` and ``unixcksum`` insecure, so a
field that offers only those (or only algorithms we do not know) is refused
rather than taken as "nothing to check".

The field arrives before anything about the message is authenticated, and the
structured-field parse costs more than linear time in its length, so the field
is refused unparsed above :data:`MAX_DIGEST_FIELD_BYTES` and refused with more
than :data:`MAX_DIGEST_MEMBERS` members (issue 7 item 8).  A real field has
one or two members of under 100 bytes each.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from http_sfv.dictionary import Dictionary
from http_sfv.item import InnerList

from custos.wimse.errors import HttpSignatureError

_ALGORITHMS: dict[str, Callable[[bytes], Any]] = {
    "sha-256": hashlib.sha256,
    "sha-512": hashlib.sha512,
}
SUPPORTED_ALGORITHMS: tuple[str, ...] = tuple(_ALGORITHMS)
#: All field lines together; a sha-512 member is 98 bytes.
MAX_DIGEST_FIELD_BYTES = 1024
#: RFC 9530 registers six algorithms; more members than this is not a real field.
MAX_DIGEST_MEMBERS = 8
#: Separators (see :func:`bounded_field_text`) a Content-Digest may hold.
MAX_DIGEST_TOKENS = 32
#: What separates structured-field tokens: members, inner-list items, parameters.
_SEPARATORS = " ,;("


def bounded_field_text(
    values: str | Sequence[str], *, max_bytes: int, max_tokens: int
) -> str | None:
    """The field lines joined as HTTP does (RFC 9110 §5.3), or None when they
    are larger than ``max_bytes`` or hold more than ``max_tokens`` separators.

    For structured fields that arrive before anything is authenticated
    (Content-Digest, Signature-Input, Signature): the structured-field parse
    costs about a microsecond per token on top of its per-byte cost, so both
    are bounded before it runs.  Linear: a length sum and four ``str.count``.
    """
    lines = [values] if isinstance(values, str) else list(values)
    # Measured before the join: the cap holds however the field is split.
    if sum(len(line) + 2 for line in lines) > max_bytes + 2:
        return None
    raw = ", ".join(lines)
    if sum(raw.count(c) for c in _SEPARATORS) > max_tokens:
        return None
    return raw


class ContentDigestError(HttpSignatureError):
    """The Content-Digest field is missing, malformed or does not match the body."""

    code = "content_digest_invalid"


class ContentDigestTooLargeError(ContentDigestError):
    """The field is larger, or has more members, than any real one."""

    code = "content_digest_too_large"


class ContentDigestMismatchError(ContentDigestError):
    code = "content_digest_mismatch"


class UnsupportedDigestAlgorithmError(ContentDigestError):
    code = "content_digest_unsupported_algorithm"


def content_digest(body: bytes, algorithms: Iterable[str] = ("sha-256",)) -> str:
    """The ``Content-Digest`` field value for ``body``."""
    field = Dictionary()
    for alg in algorithms:
        if alg not in _ALGORITHMS:
            raise UnsupportedDigestAlgorithmError(f"cannot create a {alg[:32]!r} content digest")
        field[alg] = _ALGORITHMS[alg](body).digest()
    if not field:
        raise UnsupportedDigestAlgorithmError("no digest algorithm given")
    return str(field)


def parse_content_digest(values: str | Sequence[str]) -> dict[str, bytes]:
    """The field's members as ``{algorithm: digest bytes}``; raises ContentDigestError.

    Several field lines are combined with ", " as HTTP does (RFC 9110 §5.3).
    """
    raw = bounded_field_text(values, max_bytes=MAX_DIGEST_FIELD_BYTES, max_tokens=MAX_DIGEST_TOKENS)
    if raw is None:
        raise ContentDigestTooLargeError(
            f"Content-Digest is larger than {MAX_DIGEST_FIELD_BYTES} bytes or "
            f"{MAX_DIGEST_TOKENS} tokens"
        )
    field = Dictionary()
    try:
        # ascii: a lone surrogate or any non-ASCII character fails here
        # (UnicodeEncodeError is a ValueError), never deeper in.
        field.parse(raw.encode("ascii"))
    except (ValueError, IndexError, KeyError, TypeError) as e:
        # http-sfv reports every syntax problem as one of these.
        raise ContentDigestError("Content-Digest is not a structured-field dictionary") from e
    if len(field) > MAX_DIGEST_MEMBERS:
        raise ContentDigestTooLargeError(
            f"Content-Digest has more than {MAX_DIGEST_MEMBERS} members"
        )
    out: dict[str, bytes] = {}
    for alg, member in field.items():
        value = getattr(member, "value", None)
        if not isinstance(value, bytes) or isinstance(member, InnerList):
            raise ContentDigestError(f"Content-Digest member {alg[:32]!r} is not a byte sequence")
        out[alg] = value
    return out


def verify_content_digest(values: str | Sequence[str], body: bytes | None) -> str:
    """Check ``body`` against the field; returns the algorithm that matched.

    Every supported algorithm present must match (a sender that lists two
    digests must not get away with one wrong one); algorithms we do not
    support are ignored as RFC 9530 §2 allows, but at least one supported
    algorithm must be present.
    """
    digests = parse_content_digest(values)
    data = body or b""
    checked: list[str] = []
    for alg, got in digests.items():
        fn = _ALGORITHMS.get(alg)
        if fn is None:
            continue
        # compare_digest: the digest is public, but constant time costs nothing here.
        if not hmac.compare_digest(fn(data).digest(), got):
            raise ContentDigestMismatchError(f"Content-Digest {alg} does not match the body")
        checked.append(alg)
    if not checked:
        raise UnsupportedDigestAlgorithmError(
            "Content-Digest has no supported algorithm (" + ", ".join(SUPPORTED_ALGORITHMS) + ")"
        )
    return checked[0]
