"""RFC 9530 Content-Digest: known answers, mismatches, algorithm handling, and a
parser that only ever raises custos errors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from custos.integrations.problem import http_status
from custos.wimse.digest import (
    ContentDigestError,
    ContentDigestMismatchError,
    UnsupportedDigestAlgorithmError,
    content_digest,
    parse_content_digest,
    verify_content_digest,
)
from custos.wimse.errors import HttpSignatureError, WimseError

HELLO = b'{"hello": "world"}'
# RFC 9421 Appendix B.2 (test-request body) digests.
HELLO_SHA256 = "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:"
HELLO_SHA512 = (
    "sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+TaPm+AbwAgBWnrIiYllu7"
    "BNNyealdVLvRwEmTHWXvJwew==:"
)
# RFC 9530 section 2 example: the same JSON with a trailing newline.
HELLO_NL_SHA512 = (
    "sha-512=:YMAam51Jz/jOATT6/zvHrLVgOYTGFy1d6GJiOHTohq4yP+pgk4vf2aCsyRZOtw8M"
    "jkM7iw7yZ/WkppmM44T3qg==:"
)
# draft-ietf-wimse-http-signature-06 signed response: body is the include file's
# "No ice cream today." followed by two LFs.
ICE_CREAM_BODY = b"No ice cream today.\n\n"
ICE_CREAM_DIGEST = "sha-256=:UHKweBl9cpjdVqgTB65El8SexXlJYGG+XIslAYqC1mY=:"


def test_known_answers() -> None:
    assert content_digest(HELLO) == HELLO_SHA256
    assert content_digest(HELLO, ["sha-512"]) == HELLO_SHA512
    assert content_digest(HELLO, ["sha-256", "sha-512"]) == f"{HELLO_SHA256}, {HELLO_SHA512}"
    assert content_digest(HELLO + b"\n", ["sha-512"]) == HELLO_NL_SHA512
    assert content_digest(ICE_CREAM_BODY) == ICE_CREAM_DIGEST


def test_verify_known_answers() -> None:
    assert verify_content_digest(HELLO_SHA256, HELLO) == "sha-256"
    assert verify_content_digest(HELLO_SHA512, HELLO) == "sha-512"
    assert verify_content_digest(HELLO_NL_SHA512, HELLO + b"\n") == "sha-512"
    assert verify_content_digest(ICE_CREAM_DIGEST, ICE_CREAM_BODY) == "sha-256"


def test_field_lines_are_combined() -> None:
    assert verify_content_digest([HELLO_SHA256, HELLO_SHA512], HELLO) == "sha-256"


def test_changed_body_is_a_mismatch() -> None:
    with pytest.raises(ContentDigestMismatchError) as err:
        verify_content_digest(HELLO_SHA256, HELLO + b" ")
    assert err.value.code == "content_digest_mismatch"
    assert isinstance(err.value, HttpSignatureError)
    assert http_status(err.value) == 400


def test_one_wrong_digest_among_two_is_a_mismatch() -> None:
    wrong512 = content_digest(b"other", ["sha-512"])
    with pytest.raises(ContentDigestMismatchError):
        verify_content_digest(f"{HELLO_SHA256}, {wrong512}", HELLO)


def test_missing_body_is_checked_as_empty() -> None:
    assert verify_content_digest(content_digest(b""), None) == "sha-256"
    with pytest.raises(ContentDigestMismatchError):
        verify_content_digest(HELLO_SHA256, None)


@pytest.mark.parametrize(
    "field",
    [
        "md5=:XrY7u+Ae7tCTyyK7j1rNww==:",  # insecure, RFC 9530 section 5
        "unixsum=:AAAA:",
        "sha-3=:AAAA:",
    ],
)
def test_no_supported_algorithm_is_refused(field: str) -> None:
    with pytest.raises(UnsupportedDigestAlgorithmError) as err:
        verify_content_digest(field, HELLO)
    assert err.value.code == "content_digest_unsupported_algorithm"


def test_unknown_algorithms_beside_a_good_one_are_ignored() -> None:
    assert verify_content_digest(f"md5=:AAAA:, {HELLO_SHA256}", HELLO) == "sha-256"


def test_cannot_create_unknown_algorithm() -> None:
    with pytest.raises(UnsupportedDigestAlgorithmError):
        content_digest(HELLO, ["md5"])
    with pytest.raises(UnsupportedDigestAlgorithmError):
        content_digest(HELLO, [])


@pytest.mark.parametrize(
    "field",
    [
        "",
        "sha-256",  # bare key = boolean true, not a byte sequence
        'sha-256="X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE="',  # a string
        "sha-256=(:AAAA:)",  # inner list
        "sha-256=:not base64:",
        "SHA-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:",  # keys are lowercase
        "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:,",
        "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=: garbage",
        "sha-256=:é:",
    ],
)
def test_malformed_fields(field: str) -> None:
    with pytest.raises(ContentDigestError) as err:
        verify_content_digest(field, HELLO)
    assert err.value.code == "content_digest_invalid"


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.text(alphabet='sha-256=:+/AZaz09,;() \t"?*')))
def test_parser_raises_only_custos_errors(field: str) -> None:
    try:
        parsed = parse_content_digest(field)
    except WimseError:
        return
    assert all(isinstance(v, bytes) for v in parsed.values())


# -- bounded work (issue 7 item 8): the field is attacker-controlled ---------------------


def test_oversized_field_is_refused_unparsed() -> None:
    from custos.wimse.digest import MAX_DIGEST_FIELD_BYTES

    field = HELLO_SHA256 + ", " + "x" * MAX_DIGEST_FIELD_BYTES
    with pytest.raises(ContentDigestError) as err:
        verify_content_digest(field, HELLO)
    assert err.value.code == "content_digest_too_large"
    assert http_status(err.value) == 400


def test_oversized_field_split_over_many_lines_is_refused() -> None:
    from custos.wimse.digest import MAX_DIGEST_FIELD_BYTES

    lines = [HELLO_SHA256] * (MAX_DIGEST_FIELD_BYTES // len(HELLO_SHA256) + 1)
    with pytest.raises(ContentDigestError) as err:
        parse_content_digest(lines)
    assert err.value.code == "content_digest_too_large"


def test_many_members_are_refused() -> None:
    from custos.wimse.digest import MAX_DIGEST_MEMBERS

    field = ", ".join([HELLO_SHA256] + [f"x{i}=:AAAA:" for i in range(MAX_DIGEST_MEMBERS)])
    with pytest.raises(ContentDigestError) as err:
        verify_content_digest(field, HELLO)
    assert err.value.code == "content_digest_too_large"


def test_the_historic_quadratic_field_is_refused_unparsed() -> None:
    # 16000 members made the parse take most of a second before (issue 7
    # item 8); refused by its size now, whatever the member count.
    field = ", ".join(f"a{i}=:AAAA:" for i in range(16000))
    with pytest.raises(ContentDigestError) as err:
        parse_content_digest(field)
    assert err.value.code == "content_digest_too_large"


@pytest.mark.parametrize("value", ["sha-256=:\ud800:", "\udcff", "sha-256=:X48E9qOokq\u00e9:"])
def test_non_ascii_and_lone_surrogates_are_malformed(value: str) -> None:
    with pytest.raises(ContentDigestError) as err:
        verify_content_digest(value, HELLO)
    assert err.value.code == "content_digest_invalid"


def test_a_reasonable_field_with_both_algorithms_still_verifies() -> None:
    assert verify_content_digest(f"{HELLO_SHA512}, {HELLO_SHA256}", HELLO) == "sha-512"


def test_many_tokens_are_refused_before_parsing() -> None:
    from custos.wimse.digest import MAX_DIGEST_FIELD_BYTES, MAX_DIGEST_TOKENS

    field = "a=1;b" * MAX_DIGEST_TOKENS + "broken("
    assert len(field) < MAX_DIGEST_FIELD_BYTES
    with pytest.raises(ContentDigestError) as err:
        parse_content_digest(field)
    assert err.value.code == "content_digest_too_large"
