"""The evidence's base64 fields are decoded with ``binascii.a2b_base64(strict_mode=True)``
(issue 11, "Speed"): the same verdict and bytes as ``base64.b64decode(validate=True)``,
which it replaced, on every input."""

from __future__ import annotations

import base64
import binascii
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from custos_attestors.node.aws_iid import wire


def _reference(value: str) -> bytes | None:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if 0 < len(raw) <= 64 else None


def _decoded(value: str) -> bytes | None:
    try:
        return wire._b64(value, "field", 64)
    except wire.AwsIidEvidenceError:
        return None


def test_every_short_string_over_the_edge_alphabet() -> None:
    for n in range(5):
        for chars in itertools.product("AQgw+/=-_ \n\u00e9", repeat=n):
            value = "".join(chars)
            assert _decoded(value) == _reference(value), value


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.text(max_size=90),
        st.text(st.sampled_from([*"AQgwz09+/=-_\n \t\u00e9"]), max_size=90),
        st.binary(min_size=1, max_size=64).map(lambda b: base64.b64encode(b).decode()),
    )
)
def test_generated_strings(value: str) -> None:
    assert _decoded(value) == _reference(value)


@pytest.mark.parametrize("value", ["QUJD", "QUI=", "QQ=="])
def test_canonical_base64_decodes(value: str) -> None:
    assert _decoded(value) == base64.b64decode(value)
