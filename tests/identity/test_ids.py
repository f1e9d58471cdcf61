"""Trust domains, SPIFFE IDs and WIMSE identifiers: spec rules, one test per rule,
plus property tests that the parser never crashes and never accepts junk."""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from custos.errors import CustosError
from custos.identity import (
    InvalidIdentifierError,
    SpiffeId,
    TrustDomain,
    WimseId,
    parse_workload_id,
)

# ---------------------------------------------------------------- trust domains


def test_trust_domain_parse_name_and_uri_forms() -> None:
    assert TrustDomain.parse("example.org") == TrustDomain("example.org")
    assert TrustDomain.parse("spiffe://example.org") == TrustDomain("example.org")
    td = TrustDomain.parse("my_td-1.example.org")
    assert str(td) == "my_td-1.example.org"
    assert td.id_string() == "spiffe://my_td-1.example.org"
    assert str(td.spiffe_id()) == "spiffe://my_td-1.example.org"


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("", "missing"),
        ("Example.org", "lowercase"),
        ("example.org:8080", "port"),
        ("user@example.org", "user info"),
        ("exa mple.org", "not allowed"),
        ("exa%41mple.org", "percent"),
        ("exämple.org", "not allowed"),
        ("a" * 256, "maximum is 255"),
        ("spiffe://example.org/path", "no path"),
        ("spiffe://", "missing"),
        ("http://example.org", "scheme must be 'spiffe'"),
        ("SPIFFE://example.org", "lowercase"),
    ],
)
def test_trust_domain_rejects(value: str, fragment: str) -> None:
    with pytest.raises(InvalidIdentifierError, match=re.escape(fragment)) as info:
        TrustDomain.parse(value)
    assert info.value.code == "invalid_identifier"
    assert isinstance(info.value, CustosError)


def test_trust_domain_max_length_is_accepted() -> None:
    name = "a" * 255
    assert TrustDomain.parse(name).name == name


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(InvalidIdentifierError):
        TrustDomain("Bad.Org")
    with pytest.raises(InvalidIdentifierError):
        SpiffeId(TrustDomain("example.org"), "no-leading-slash")
    with pytest.raises(InvalidIdentifierError):
        SpiffeId(TrustDomain("example.org"), "/a/../b")


# ---------------------------------------------------------------- SPIFFE IDs


@pytest.mark.parametrize(
    "value",
    [
        "spiffe://example.org",
        "spiffe://example.org/workload",
        "spiffe://example.org/ns/prod/sa/foo-service",
        "spiffe://prod.trust.domain/89a6ec51-f877-44c0-9501-b213597f2d1d",
        "spiffe://td/Path.With_All-Chars09",
        "spiffe://1.2.3.4/a",
        "spiffe://td/.../a",  # '...' is a normal segment, only '.' and '..' are dot segments
    ],
)
def test_spiffe_id_accepts_and_roundtrips(value: str) -> None:
    parsed = SpiffeId.parse(value)
    assert str(parsed) == value
    assert parse_workload_id(value) == parsed


def test_spiffe_id_parts() -> None:
    sid = SpiffeId.parse("spiffe://example.org/ns/a")
    assert sid.trust_domain == TrustDomain("example.org")
    assert sid.path == "/ns/a"
    assert sid.is_member_of(TrustDomain("example.org"))
    assert not sid.is_member_of(TrustDomain("example.com"))
    assert SpiffeId.from_parts("example.org", "/ns/a") == sid
    assert SpiffeId.from_parts(TrustDomain("example.org"), "/ns/a") == sid
    assert SpiffeId.parse("spiffe://example.org").path == ""
    assert hash(sid) == hash(SpiffeId.parse("spiffe://example.org/ns/a"))


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("", "empty"),
        ("example.org/a", "must start with 'spiffe://'"),
        ("spiffe:/example.org/a", "must start with 'spiffe://'"),
        ("SPIFFE://example.org/a", "scheme must be lowercase"),
        ("Spiffe://example.org/a", "scheme must be lowercase"),
        ("https://example.org/a", "scheme must be 'spiffe'"),
        ("spiffe:///a", "trust domain is missing"),
        ("spiffe://Example.org/a", "lowercase"),
        ("spiffe://example.org:443/a", "port"),
        ("spiffe://user@example.org/a", "user info"),
        ("spiffe://user:pw@example.org/a", "port"),
        ("spiffe://example.org/", "must not end with '/'"),
        ("spiffe://example.org/a/", "must not end with '/'"),
        ("spiffe://example.org//a", "empty segments"),
        ("spiffe://example.org/a//b", "empty segments"),
        ("spiffe://example.org/./a", "'.' or '..'"),
        ("spiffe://example.org/a/..", "'.' or '..'"),
        ("spiffe://example.org/a?x=1", "query"),
        ("spiffe://example.org?x=1", "query"),
        ("spiffe://example.org/a#frag", "fragment"),
        ("spiffe://example.org#frag", "fragment"),
        ("spiffe://example.org/a%2Fb", "percent-encoding"),
        ("spiffe://example.org/a b", "not allowed"),
        ("spiffe://example.org/a~b", "not allowed"),
        ("spiffe://example.org/caf\u00e9", "not allowed"),
        ("spiffe://example.org/" + "a" * 2028, "longer than 2048"),
        ("spiffe://example.org/" + "a" * 5000, "longer than 2048"),
    ],
)
def test_spiffe_id_rejects(value: str, fragment: str) -> None:
    with pytest.raises(InvalidIdentifierError, match=re.escape(fragment)):
        SpiffeId.parse(value)


def test_spiffe_id_exactly_2048_bytes_is_accepted() -> None:
    prefix = "spiffe://example.org/"
    value = prefix + "a" * (2048 - len(prefix))
    assert len(value) == 2048
    assert str(SpiffeId.parse(value)) == value


def test_from_parts_enforces_total_length() -> None:
    with pytest.raises(InvalidIdentifierError, match="maximum is 2048"):
        SpiffeId.from_parts("example.org", "/" + "a" * 2030)


def test_spiffe_id_rejects_non_strings() -> None:
    with pytest.raises(InvalidIdentifierError):
        SpiffeId.parse(b"spiffe://example.org/a")  # type: ignore[arg-type]
    with pytest.raises(InvalidIdentifierError):
        parse_workload_id(None)  # type: ignore[arg-type]


def test_from_parts_validates_path() -> None:
    with pytest.raises(InvalidIdentifierError, match="start with '/'"):
        SpiffeId.from_parts("example.org", "ns/a")
    with pytest.raises(InvalidIdentifierError, match="lowercase"):
        SpiffeId.from_parts("Example.org", "/ns/a")


# ---------------------------------------------------------------- WIMSE identifiers


@pytest.mark.parametrize(
    "value",
    [
        "wimse://trust.example.com/service/payment",
        "wimse://trust.example.com/service/payment/instance/1234",
        "wimse://prod.corp.example/workload/89a6ec51-f877-44c0-9501-b213597f2d1d",
        "wimse://td/home~user",
    ],
)
def test_wimse_id_accepts_draft_examples(value: str) -> None:
    parsed = WimseId.parse(value)
    assert str(parsed) == value
    assert parse_workload_id(value) == parsed
    assert isinstance(parse_workload_id(value), WimseId)


def test_wimse_and_spiffe_ids_differ() -> None:
    w = WimseId.parse("wimse://example.org/a")
    s = SpiffeId.parse("spiffe://example.org/a")
    assert w.trust_domain == s.trust_domain and w.path == s.path
    assert w != s


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("wimse://example.org", "needs a path"),
        ("WIMSE://example.org/a", "lowercase"),
        ("wimse://example.org:80/a", "port"),
        ("wimse://u@example.org/a", "user info"),
        ("wimse://example.org/a?q", "query"),
        ("wimse://example.org/a#f", "fragment"),
        ("wimse://example.org/a/", "end with '/'"),
        ("wimse://example.org/a/../b", "'.' or '..'"),
        ("wimse://example.org/a%20b", "percent"),
        ("wimse://example.org/a:b", "not allowed"),
        ("wimse:///a", "missing"),
    ],
)
def test_wimse_id_rejects(value: str, fragment: str) -> None:
    with pytest.raises(InvalidIdentifierError, match=re.escape(fragment)):
        WimseId.parse(value)


def test_parse_workload_id_unknown_scheme() -> None:
    with pytest.raises(InvalidIdentifierError, match="spiffe://' or 'wimse://"):
        parse_workload_id("https://example.org/a")
    with pytest.raises(InvalidIdentifierError, match="empty"):
        parse_workload_id("")


# ---------------------------------------------------------------- property tests

_TD_ALPHABET = string.ascii_lowercase + string.digits + ".-_"
_PATH_ALPHABET = string.ascii_letters + string.digits + ".-_"

trust_domains = st.text(alphabet=_TD_ALPHABET, min_size=1, max_size=40)
segments = st.text(alphabet=_PATH_ALPHABET, min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..")
)
paths = st.lists(segments, max_size=6).map(lambda segs: "".join("/" + s for s in segs))
valid_spiffe_ids = st.builds(lambda td, p: f"spiffe://{td}{p}", trust_domains, paths)

# Characters that appear in URIs and around them, so random strings often look
# almost valid, plus some that never may.
_NOISY = _PATH_ALPHABET + "/:@?#%~ !$&'()*+,;=[]\\\x00\u00e9\u2603" + "SPIFFEwimse"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=_NOISY, max_size=60) | st.text(max_size=60))
def test_parse_never_crashes_and_accepted_ids_roundtrip(value: str) -> None:
    for parse in (SpiffeId.parse, WimseId.parse, parse_workload_id, TrustDomain.parse):
        try:
            parsed = parse(value)
        except InvalidIdentifierError:
            continue
        if isinstance(parsed, TrustDomain):
            assert value in (parsed.name, parsed.id_string())
        else:
            # Accepted means canonical: nothing was normalised away.
            assert str(parsed) == value


@settings(max_examples=300, deadline=None)
@given(
    st.builds(
        lambda td, p: f"spiffe:{td}{p}",
        st.just("//") | st.text(_NOISY, max_size=3),
        st.text(alphabet=_NOISY, max_size=40),
    )
)
def test_prefixed_noise_never_crashes(value: str) -> None:
    try:
        parsed = SpiffeId.parse(value)
    except InvalidIdentifierError:
        return
    assert str(parsed) == value
    _assert_valid_by_spec(value)


def _assert_valid_by_spec(value: str) -> None:
    """An independent (regex) statement of the SPIFFE ID grammar."""
    assert len(value) <= 2048
    m = re.fullmatch(r"spiffe://([a-z0-9._-]{1,255})((?:/[A-Za-z0-9._-]+)*)", value)
    assert m is not None, value
    assert all(seg not in (".", "..") for seg in m.group(2).split("/")[1:])


@settings(max_examples=200, deadline=None)
@given(valid_spiffe_ids)
def test_valid_ids_roundtrip(value: str) -> None:
    parsed = SpiffeId.parse(value)
    assert str(parsed) == value
    assert SpiffeId.from_parts(parsed.trust_domain, parsed.path) == parsed
    wimse = value.replace("spiffe://", "wimse://", 1)
    if parsed.path:
        assert str(WimseId.parse(wimse)) == wimse


@settings(max_examples=300, deadline=None)
@given(
    valid_spiffe_ids,
    st.sampled_from([*"?#%:@ \\/", "\u00e9", "A", "//", "/./", "/../", "/"]),
    st.integers(min_value=0),
)
def test_corrupted_ids_are_rejected(value: str, bad: str, where: int) -> None:
    """Insert something forbidden into a valid ID; the result must be rejected
    unless the insertion happens to form another valid ID (checked by regex)."""
    start = len("spiffe://")
    pos = start + where % (len(value) - start + 1)
    corrupted = value[:pos] + bad + value[pos:]
    try:
        parsed = SpiffeId.parse(corrupted)
    except InvalidIdentifierError:
        return
    # Only uppercase in the path or a well-formed extra segment can stay valid.
    _assert_valid_by_spec(corrupted)
    assert str(parsed) == corrupted


# ---------------------------------------------------------------- plain strings at the boundary


def test_coerce_trust_domain_accepts_strings_and_values() -> None:
    from custos.identity import coerce_trust_domain

    td = TrustDomain("example.org")
    assert coerce_trust_domain(td) is td
    assert coerce_trust_domain("example.org") == td
    assert coerce_trust_domain("spiffe://example.org") == td
    for bad in ("Example.org", "spiffe://example.org/w", "", b"example.org", 7, None):
        with pytest.raises(InvalidIdentifierError):
            coerce_trust_domain(bad)  # type: ignore[arg-type]


def test_coerce_spiffe_id_refuses_bare_trust_domain_unless_asked() -> None:
    from custos.identity import coerce_spiffe_id

    sid = SpiffeId.parse("spiffe://example.org/w")
    assert coerce_spiffe_id(sid) is sid
    assert coerce_spiffe_id("spiffe://example.org/w") == sid
    with pytest.raises(InvalidIdentifierError) as info:
        coerce_spiffe_id("spiffe://example.org")
    assert info.value.code == "not_workload_id"
    with pytest.raises(InvalidIdentifierError) as info:
        coerce_spiffe_id(TrustDomain("example.org").spiffe_id())
    assert info.value.code == "not_workload_id"
    assert coerce_spiffe_id("spiffe://example.org", workload=False).path == ""
    for bad in ("wimse://example.org/w", "spiffe://example.org/", 3, None):
        with pytest.raises(InvalidIdentifierError):
            coerce_spiffe_id(bad)  # type: ignore[arg-type]


def test_coerce_workload_id_names_a_workload() -> None:
    from custos.identity import coerce_workload_id

    assert coerce_workload_id("wimse://example.org/w") == WimseId.parse("wimse://example.org/w")
    assert coerce_workload_id("spiffe://example.org/w") == SpiffeId.parse("spiffe://example.org/w")
    wid = WimseId.parse("wimse://example.org/x")
    assert coerce_workload_id(wid) is wid
    for bare in ("spiffe://example.org", SpiffeId.parse("spiffe://example.org")):
        with pytest.raises(InvalidIdentifierError) as info:
            coerce_workload_id(bare)
        assert info.value.code == "not_workload_id"
    for bad in ("https://example.org/w", TrustDomain("example.org"), 1.5):
        with pytest.raises(InvalidIdentifierError):
            coerce_workload_id(bad)  # type: ignore[arg-type]


def test_from_parts_takes_plain_trust_domain_strings() -> None:
    assert SpiffeId.from_parts("spiffe://example.org", "/w") == SpiffeId.parse(
        "spiffe://example.org/w"
    )
    with pytest.raises(InvalidIdentifierError):
        SpiffeId.from_parts(42, "/w")  # type: ignore[arg-type]
