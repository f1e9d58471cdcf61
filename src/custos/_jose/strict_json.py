"""One strict JSON reader for every JOSE header, claim set, JWK and bundle.

RFC 8259 leaves duplicate member names, lone surrogates and huge nesting to
the implementation, and Python's ``json`` accepts all three plus ``NaN`` /
``Infinity``.  Two parsers that disagree on such a document are how token
smuggling starts (one sees ``"sub": "a"``, the other ``"sub": "b"``), so each
of them is refused here, at every nesting level.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

#: RFC 8259 section 2: the only white space JSON allows around a value.
_WHITESPACE = " \t\n\r"

#: Deeper than any header, claim set or bundle that is not an attack.
MAX_DEPTH = 32

#: A ``\\u`` escape of a surrogate code unit: the only way a JSON text that is
#: valid UTF-8 can produce a lone surrogate (UTF-8 itself cannot encode one).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        # RFC 7515 section 4: reject or take the last; we reject, so no two
        # readers of one token can disagree on which member won.
        raise ValueError("duplicate member")
    return out


def _reject_constant(_: str) -> Any:
    raise ValueError("NaN / Infinity are not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: an "exp" that never comes
        raise ValueError("number out of range")
    return value


#: Built once: json.loads with hooks would build a decoder per call.
_DECODER = json.JSONDecoder(
    object_pairs_hook=_reject_duplicates,
    parse_constant=_reject_constant,
    parse_float=_finite_float,
)


def _check_tree(value: object, depth: int) -> None:
    """Refuse nesting deeper than MAX_DEPTH and strings with lone surrogates."""
    if depth > MAX_DEPTH:
        raise ValueError("JSON nested too deeply")
    if isinstance(value, str):
        # encode() refuses a lone surrogate (a pair was joined by the decoder).
        value.encode("utf-8")
    elif isinstance(value, dict):
        for key, item in value.items():
            key.encode("utf-8")
            _check_tree(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_tree(item, depth + 1)


def loads_strict(data: bytes | str) -> dict[str, Any]:
    """Parse ``data`` (UTF-8 bytes or text) as one JSON object, strictly.

    Raises ValueError (UnicodeError is one) on invalid UTF-8, a byte order
    mark, anything but an object at the top, duplicate member names at any
    level, NaN / Infinity / out-of-range numbers, lone surrogates (escaped),
    nesting deeper than :data:`MAX_DEPTH`, or trailing data.
    """
    if isinstance(data, (bytes, bytearray)):
        text = data.decode("utf-8")
    elif isinstance(data, str):
        text = data
        text.encode("utf-8")  # a str may hold a raw lone surrogate
    else:
        raise ValueError("JSON text must be bytes or str")
    try:
        # raw_decode (public API) on the text without leading white space,
        # then "only white space after the value": exactly what decode()
        # does, without its two extra regex passes and call layers.
        body = text.lstrip(_WHITESPACE)
        doc, end = _DECODER.raw_decode(body)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if end != len(body) and body[end:].strip(_WHITESPACE):
        raise ValueError("trailing data after the JSON value")
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    # The walk is skipped when it cannot find anything: no surrogate escape,
    # and fewer brackets than the depth limit.  Real tokens take this path.
    if _SURROGATE_ESCAPE.search(text) or text.count("{") + text.count("[") > MAX_DEPTH:
        _check_tree(doc, 1)
    return doc


__all__ = ["MAX_DEPTH", "loads_strict"]
