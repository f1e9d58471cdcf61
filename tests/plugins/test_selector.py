"""Selector: bounded, printable, ``type:value``."""

from __future__ import annotations

import pytest

from custos.identity import InvalidIdentifierError
from custos.identity.selector import (
    MAX_SELECTOR_TYPE_LENGTH,
    MAX_SELECTOR_VALUE_LENGTH,
    InvalidSelectorError,
    Selector,
)


def test_round_trip_keeps_colons_in_the_value() -> None:
    s = Selector.parse("docker:label:com.example:team")
    assert s == Selector("docker", "label:com.example:team")
    assert str(s) == "docker:label:com.example:team"
    assert sorted([Selector("b", "1"), Selector("a", "2")])[0].type == "a"


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        ("", "x"),
        ("unix", ""),
        ("Unix", "x"),
        ("un:ix", "x"),
        ("u" * (MAX_SELECTOR_TYPE_LENGTH + 1), "x"),
        ("unix", "x" * (MAX_SELECTOR_VALUE_LENGTH + 1)),
        ("unix", "uid:0\nunix:uid:1"),
        ("unix", "uid:\x1b[31m0"),
        ("unix", "uid:\u202e0"),  # bidi override
        ("unix", "uid:\u200b0"),  # zero-width space
        ("unix", "uid:\ud8000"),  # lone surrogate
        ("unix", "uid:\u20280"),  # line separator
        (1, "x"),
        ("unix", b"x"),
    ],
)
def test_invalid_selectors_are_refused(kind: object, value: object) -> None:
    with pytest.raises(InvalidSelectorError) as exc:
        Selector(kind, value)  # type: ignore[arg-type]
    assert isinstance(exc.value, InvalidIdentifierError)
    assert exc.value.code == "invalid_selector"


def test_parse_needs_a_colon() -> None:
    with pytest.raises(InvalidSelectorError, match="no ':'"):
        Selector.parse("unix")
    with pytest.raises(InvalidSelectorError):
        Selector.parse(None)  # type: ignore[arg-type]


def test_printable_unicode_values_are_kept() -> None:
    assert Selector("k8s", "ns:zahlungsverkehr-ü").value.endswith("ü")
