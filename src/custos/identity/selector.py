"""Selectors: the ``type:value`` facts an attestor states about a node or a workload.

A registration entry matches a caller when the entry's selectors are a subset of
the caller's.  The *type* names the attestor that vouches for the value; custos'
plugin catalog sets it to the plugin's own name, so no plugin can state another
plugin's facts (see docs/decisions/0024-typed-attestor-plugins.md).

Both parts are bounded and printable: selectors are shown to operators
(``entry show``), stored in the datastore and compared byte for byte, so control
and invisible formatting characters are refused rather than displayed.
"""

from __future__ import annotations

import re
import string
import unicodedata
from dataclasses import dataclass

from custos.identity.errors import InvalidIdentifierError

#: Selector types are plugin names: short, lower-case, usable as a SPIFFE path segment.
MAX_SELECTOR_TYPE_LENGTH = 64
#: Values are facts (a uid, a namespace, a hash, a label): 1 KiB is far above any real one.
MAX_SELECTOR_VALUE_LENGTH = 1024
_TYPE_CHARS = frozenset(string.ascii_lowercase + string.digits + "_-")
# Cc: C0/C1 controls (newlines, escapes); Cf: invisible format characters (bidi
# overrides, zero-width joiners) that make two selectors look alike; Cs: lone
# surrogates (not encodable); Zl/Zp: line and paragraph separators.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
#: The accepted types in one compiled pattern: the fast path of check_selector_type
#: (an attestation stamps the plugin's name on every selector; issue 11, "Speed").
_TYPE_PATTERN = re.compile(rf"[a-z0-9_-]{{1,{MAX_SELECTOR_TYPE_LENGTH}}}")


class InvalidSelectorError(InvalidIdentifierError):
    """A selector type or value is empty, too long, or holds a refused character."""

    code = "invalid_selector"


def _bounded_str(value: object, part: str, limit: int) -> str:
    if not isinstance(value, str):
        raise InvalidSelectorError(f"selector {part} must be a string, not {type(value).__name__}")
    if not value:
        raise InvalidSelectorError(f"selector {part} is empty")
    if len(value) > limit:
        raise InvalidSelectorError(f"selector {part} is longer than {limit} characters")
    return value


def check_selector_type(value: object) -> str:
    """Return *value* if it is a valid selector type (also the rule for plugin names)."""
    if isinstance(value, str) and _TYPE_PATTERN.fullmatch(value):
        # The whole rule in one C call; anything else takes the checks below, which
        # refuse it and say why (same verdicts: tests/identity/test_identity_fast_paths.py).
        return value
    value = _bounded_str(value, "type", MAX_SELECTOR_TYPE_LENGTH)
    bad = next((ch for ch in value if ch not in _TYPE_CHARS), None)
    if bad is not None:
        raise InvalidSelectorError(
            f"selector type {value[:40]!r} holds {bad!r}; allowed: lower-case letters, "
            "digits, '_' and '-'"
        )
    return value


def check_selector_value(value: object) -> str:
    """Return *value* if it is a valid selector value."""
    value = _bounded_str(value, "value", MAX_SELECTOR_VALUE_LENGTH)
    if value.isprintable():
        # str.isprintable is False for every character of the refused categories
        # (and for Co, Cn and Zs other than " ", which are allowed), so a printable
        # value needs no per-character lookup: one C pass instead of one
        # unicodedata.category call per character (tests/identity/test_identity_fast_paths.py).
        return value
    for ch in value:
        if unicodedata.category(ch) in _REFUSED_CATEGORIES:
            raise InvalidSelectorError(
                f"selector value holds the control or format character U+{ord(ch):04X}"
            )
    return value


@dataclass(frozen=True, order=True)
class Selector:
    """One ``type:value`` selector, e.g. ``Selector("unix", "uid:1000")``."""

    type: str
    value: str

    def __post_init__(self) -> None:
        check_selector_type(self.type)
        check_selector_value(self.value)

    @classmethod
    def parse(cls, s: str) -> Selector:
        """Parse ``type:value`` (the value may itself contain ``:``)."""
        if not isinstance(s, str):
            raise InvalidSelectorError(f"selector must be a string, not {type(s).__name__}")
        kind, colon, value = s.partition(":")
        if not colon:
            raise InvalidSelectorError(f"selector {s[:40]!r} has no ':' between type and value")
        return cls(kind, value)

    def __str__(self) -> str:
        return f"{self.type}:{self.value}"


__all__ = [
    "MAX_SELECTOR_TYPE_LENGTH",
    "MAX_SELECTOR_VALUE_LENGTH",
    "InvalidSelectorError",
    "Selector",
    "check_selector_type",
    "check_selector_value",
]
