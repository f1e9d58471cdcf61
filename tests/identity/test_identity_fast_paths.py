"""The one-call fast paths of the identity checks (issue 11, "Speed") give the same
verdict as the rules they shortcut.

``check_selector_type``, ``check_selector_value``, the trust-domain check and the
SPIFFE / WIMSE path check accept a value in one C call (a compiled pattern,
``str.isprintable``) and fall back to the character walk, which refuses and names
the broken rule. Each test states the rule independently of the code (a reference
predicate written from the spec text in the module docstrings) and checks the real
function against it over every code point or over generated strings.
"""

from __future__ import annotations

import sys
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from custos.identity import InvalidIdentifierError, SpiffeId, TrustDomain, WimseId
from custos.identity.selector import (
    MAX_SELECTOR_TYPE_LENGTH,
    MAX_SELECTOR_VALUE_LENGTH,
    InvalidSelectorError,
    Selector,
    check_selector_type,
    check_selector_value,
)

_REFUSED_CATEGORIES = {"Cc", "Cf", "Cs", "Zl", "Zp"}
TD = TrustDomain("example.org")


def _accepts(check: object, value: object) -> bool:
    assert callable(check)
    try:
        assert check(value) is value
    except InvalidIdentifierError:
        return False
    return True


# ------------------------------------------------------------- reference rules


def _value_ok(value: str) -> bool:
    return 0 < len(value) <= MAX_SELECTOR_VALUE_LENGTH and not any(
        unicodedata.category(ch) in _REFUSED_CATEGORIES for ch in value
    )


def _type_ok(value: str) -> bool:
    allowed = set("abcdefghijklmnopqrstuvwxyz0123456789_-")
    return 0 < len(value) <= MAX_SELECTOR_TYPE_LENGTH and set(value) <= allowed


def _path_ok(path: str, allowed: set[str]) -> bool:
    if path == "":
        return True
    if not path.startswith("/"):
        return False
    return all(seg not in ("", ".", "..") and set(seg) <= allowed for seg in path[1:].split("/"))


_SPIFFE_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")
_WIMSE_CHARS = _SPIFFE_CHARS | {"~"}
_TD_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789.-_")


# ------------------------------------------------------------- selector values


def test_every_code_point_as_a_selector_value_gets_the_rules_verdict() -> None:
    """str.isprintable is the fast path: it must never accept a refused category."""
    for cp in range(sys.maxunicode + 1):
        ch = chr(cp)
        assert _accepts(check_selector_value, ch) == _value_ok(ch), hex(cp)
        assert _accepts(check_selector_value, "uid:" + ch + "0") == _value_ok(ch), hex(cp)


#: Printable ASCII, then one character of each category near the rule's edges: Cc, Cf,
#: Zs (allowed), Zl, Zp, Co (allowed), Cs, Cn (allowed), a non-ASCII letter.
_VALUE_CHARS = st.sampled_from(
    [
        *"ab:/=. -_~0\n\t\x00\x7f\x85\u00a0\u00ad\u200b\u200e\u202e\u2028\u2029\u3000",
        *"\ue000\U000e0001\ud800\U0010ffff\u0378é",
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(), st.text(_VALUE_CHARS), st.text(_VALUE_CHARS, min_size=1000)))
def test_selector_values_get_the_rules_verdict(value: str) -> None:
    assert _accepts(check_selector_value, value) == _value_ok(value)


def test_a_refused_value_still_names_the_character() -> None:
    with pytest.raises(InvalidSelectorError, match="U\\+200B"):
        Selector("unix", "uid:\u200b1000")
    with pytest.raises(InvalidSelectorError, match="longer than 1024"):
        Selector("unix", "x" * 1025)
    assert Selector("unix", "x" * 1024).value == "x" * 1024
    # Allowed though not printable: private use, unassigned, non-ASCII spaces.
    for value in ("\ue000", "\u0378", "a\u00a0b", "a\u3000b"):
        assert Selector("unix", value).value == value


# ------------------------------------------------------------- selector types


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.text(),
        st.text(st.sampled_from([*"az09_-A.:\n/ é\u0131"]), max_size=70),
    )
)
def test_selector_types_get_the_rules_verdict(value: str) -> None:
    assert _accepts(check_selector_type, value) == _type_ok(value)


def test_type_edges() -> None:
    assert check_selector_type("a" * MAX_SELECTOR_TYPE_LENGTH)
    for bad in ("", "a" * (MAX_SELECTOR_TYPE_LENGTH + 1), "aws_iid\n", "Unix", "k8s:ns", 1):
        with pytest.raises(InvalidSelectorError):
            check_selector_type(bad)


# ------------------------------------------------------------- IDs


_PATH_CHARS = st.sampled_from([*"/./../a-_~Z9%?#\né :"])


@settings(max_examples=600, deadline=None)
@given(st.one_of(st.text(_PATH_CHARS, max_size=24), st.text(max_size=12)))
def test_paths_get_the_rules_verdict(path: str) -> None:
    def spiffe(p: str) -> SpiffeId:
        return SpiffeId(TD, p)

    def wimse(p: str) -> WimseId:
        return WimseId(TD, p) if p else WimseId(TD, "/x")  # an empty WIMSE path is refused

    for make, allowed in ((spiffe, _SPIFFE_CHARS), (wimse, _WIMSE_CHARS)):
        try:
            made = make(path)
        except InvalidIdentifierError:
            assert not _path_ok(path, allowed), path
        else:
            assert _path_ok(path, allowed), path
            assert made.path in (path, "/x")


@pytest.mark.parametrize(
    "path", ["/.", "/..", "/a/.", "/a/../b", "/a//b", "/a/", "//", "/\n", "/a\n", "a", "/a?b"]
)
def test_dot_segments_and_the_rest_are_still_refused(path: str) -> None:
    with pytest.raises(InvalidIdentifierError):
        SpiffeId(TD, path)
    with pytest.raises(InvalidIdentifierError):
        WimseId(TD, path)


@pytest.mark.parametrize("path", ["/...", "/.a", "/a.", "/..a", "/a/.../b", "/-_."])
def test_dots_inside_a_segment_are_kept(path: str) -> None:
    assert SpiffeId(TD, path).path == path
    assert WimseId(TD, path + "~").path == path + "~"


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.text(max_size=8),
        st.text(st.sampled_from([*"az09.-_A:@/% \né"]), max_size=260),
    )
)
def test_trust_domains_get_the_rules_verdict(name: str) -> None:
    ok = 0 < len(name) <= 255 and set(name) <= _TD_CHARS
    try:
        made = TrustDomain(name)
    except InvalidIdentifierError:
        assert not ok, name
    else:
        assert ok, name
        assert made.name == name
