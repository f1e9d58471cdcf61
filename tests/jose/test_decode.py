"""The strict decoder of custos._jose: base64url, JSON, compact JWS.

Each hostile input class gets its own negative tests; each one is accepted by
Python's json / base64 as they come, so every test here fails without the
strict layer.
"""

from __future__ import annotations

import base64
import json

import pytest

from custos._jose import (
    MAX_DEPTH,
    JoseError,
    b64url_decode,
    b64url_encode,
    decode_compact,
    loads_strict,
)
from custos.errors import CustosError


def _part(obj: object) -> str:
    return b64url_encode(json.dumps(obj).encode())


def _raw_part(text: str | bytes) -> str:
    return b64url_encode(text.encode() if isinstance(text, str) else text)


# -- base64url ---------------------------------------------------------------


def test_b64url_round_trip() -> None:
    for n in range(10):
        data = bytes(range(n))
        assert b64url_decode(b64url_encode(data)) == data


@pytest.mark.parametrize(
    "value",
    [
        "AQ==",  # padding
        "AQ=",
        "A",  # length 1 mod 4
        "AQ+/",  # standard, not url-safe, alphabet
        "A Q",  # whitespace
        "AQ\n",
        "AR",  # non-canonical: stray low bits in the last character
        "AQF",  # b"\x01\x01" is "AQE"; "F" sets one of the 2 unused bits
        "é" * 4,  # non-ASCII
        "AQ!!",
    ],
)
def test_b64url_refuses_non_canonical(value: str) -> None:
    with pytest.raises(ValueError):
        b64url_decode(value)


def test_python_base64_accepts_what_we_refuse() -> None:
    # Shows the refusal is ours: urlsafe_b64decode reads "AR==" as b"\x01".
    assert base64.urlsafe_b64decode("AR==") == b"\x01"
    with pytest.raises(ValueError):
        b64url_decode("AR")


# -- strict JSON ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '{"a": 1, "a": 2}',
        '{"a": {"b": 1, "b": 1}}',
        '{"a": [{"b": 1}, {"c": 1, "c": 2}]}',
    ],
)
def test_duplicate_members_refused_at_every_level(text: str) -> None:
    json.loads(text)  # Python takes the last one silently
    with pytest.raises(ValueError, match="duplicate"):
        loads_strict(text.encode())


@pytest.mark.parametrize(
    "text", ['{"exp": NaN}', '{"exp": Infinity}', '{"exp": -Infinity}', '{"a": [1e999]}']
)
def test_non_finite_numbers_refused(text: str) -> None:
    json.loads(text)
    with pytest.raises(ValueError):
        loads_strict(text.encode())


@pytest.mark.parametrize(
    "text",
    [
        '{"aud": "\\ud800"}',
        '{"aud": ["x", "\\udfff"]}',
        '{"\\ud800": 1}',
        '{"a": {"b": "x\\uDBFFy"}}',
    ],
)
def test_lone_surrogates_refused(text: str) -> None:
    json.loads(text)
    with pytest.raises(ValueError):
        loads_strict(text.encode())


def test_surrogate_pair_is_one_character_and_accepted() -> None:
    assert loads_strict(b'{"a": "\\ud83d\\ude00"}') == {"a": "\U0001f600"}


def test_raw_lone_surrogate_in_str_input_refused() -> None:
    with pytest.raises(ValueError):
        loads_strict('{"a": "\ud800"}')


@pytest.mark.parametrize(
    "data",
    [
        b'{"a": "\xff"}',  # invalid UTF-8
        b'{"a": "\xed\xa0\x80"}',  # a surrogate encoded in UTF-8 (CESU)
        b"\xef\xbb\xbf{}",  # byte order mark
        b"[]",
        b'"x"',
        b"1",
        b"{} {}",
        b"{}x",
    ],
)
def test_other_non_json_object_input_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        loads_strict(data)


def test_depth_bounded() -> None:
    ok = '{"a":' * (MAX_DEPTH - 1) + "1" + "}" * (MAX_DEPTH - 1)
    assert loads_strict(ok)
    deep_objects = '{"a":' * (MAX_DEPTH + 1) + "1" + "}" * (MAX_DEPTH + 1)
    deep_arrays = '{"a":' + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "}"
    very_deep = '{"a":' + "[" * 100_000 + "]" * 100_000 + "}"
    for text in (deep_objects, deep_arrays, very_deep):
        with pytest.raises(ValueError):
            loads_strict(text.encode())


# -- compact JWS -----------------------------------------------------------------

HEADER = _part({"alg": "ES256", "typ": "JWT"})
CLAIMS = _part({"sub": "spiffe://example.org/w"})
SIG = b64url_encode(b"\x01" * 64)


def _code(token: object, max_length: int = 8192) -> str:
    with pytest.raises(JoseError) as info:
        decode_compact(token, max_length=max_length)
    assert isinstance(info.value, CustosError)
    return info.value.code


def test_decode_compact_parts() -> None:
    token = f"{HEADER}.{CLAIMS}.{SIG}"
    jws = decode_compact(token, max_length=8192)
    assert jws.header == {"alg": "ES256", "typ": "JWT"}
    assert jws.claims == {"sub": "spiffe://example.org/w"}
    assert jws.payload == json.dumps({"sub": "spiffe://example.org/w"}).encode()
    assert jws.signing_input == f"{HEADER}.{CLAIMS}".encode()
    assert jws.signature == b"\x01" * 64


def test_header_copy_is_private() -> None:
    token = f"{HEADER}.{CLAIMS}.{SIG}"
    decode_compact(token, max_length=8192).header["alg"] = "none"
    assert decode_compact(token, max_length=8192).header["alg"] == "ES256"


@pytest.mark.parametrize(
    "token",
    [
        None,
        b"a.b.c",
        f"{HEADER}.{CLAIMS}",
        f"{HEADER}.{CLAIMS}.{SIG}.x",
        f"{HEADER}=.{CLAIMS}.{SIG}",
        _raw_part('{"alg":"ES256","alg":"none"}') + f".{CLAIMS}.{SIG}",
        f"{HEADER}." + _raw_part('{"sub":"a","sub":"b"}') + f".{SIG}",
        f"{HEADER}." + _raw_part('{"exp":NaN}') + f".{SIG}",
        f"{HEADER}." + _raw_part(b'{"aud":"\xff"}') + f".{SIG}",
        f"{HEADER}." + _raw_part('{"aud":"\\ud800"}') + f".{SIG}",
        f"{_part({'alg': 'ES256', 'crit': ['exp']})}.{CLAIMS}.{SIG}",
        f"{HEADER}.{_part([1])}.{SIG}",
        f"{HEADER}.{CLAIMS}.{SIG}\u00e9",
    ],
)
def test_malformed_tokens_refused(token: object) -> None:
    assert _code(token) == "jose_malformed"


def test_size_cap_checked_first() -> None:
    assert _code("x" * 101, max_length=100) == "jose_too_large"
    assert _code(f"{HEADER}.{CLAIMS}.{SIG}", max_length=10) == "jose_too_large"


def test_long_and_nested_headers_decode_and_stay_private() -> None:
    long_head = _part({"alg": "ES256", "kid": "k" * 1000})
    assert (
        decode_compact(f"{long_head}.{CLAIMS}.{SIG}", max_length=8192).header["kid"] == "k" * 1000
    )
    nested = _part({"alg": "ES256", "jwk": {"kty": "EC"}})
    token = f"{nested}.{CLAIMS}.{SIG}"
    decode_compact(token, max_length=8192).header["jwk"]["kty"] = "changed"
    assert decode_compact(token, max_length=8192).header["jwk"] == {"kty": "EC"}
