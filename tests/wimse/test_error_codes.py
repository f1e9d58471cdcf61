"""Every error code the verification side can raise is a published one.

Clients and dashboards key on ``code``: one condition must have one code
whatever the variant (two WITs are ``wit_multiple`` on the WPT path and on the
HTTP-signature path), and every code must be in a set a caller can look up.
The codes are read from the source (``_fail("...")``, ``code="..."``,
``code = "..."``), so a new literal that is not published fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import custos.integrations.errors  # its WimseError subclasses count as published
import custos.wimse
from custos.wimse.errors import WimseError
from custos.wimse.httpsig import HTTPSIG_ERROR_CODES
from custos.wimse.wit import WIT_ERROR_CODES
from custos.wimse.wpt import WPT_ERROR_CODES

SRC = Path(custos.wimse.__file__).parent.parent
#: the modules on the verifying side: every module of custos.wimse and
#: custos.integrations except the sender side (auth and signer raise their own
#: client errors; policy.py raises configuration errors at start-up).
SENDER_SIDE = {"auth.py", "signer.py", "httpx.py", "requests.py", "policy.py"}
MODULES = sorted(
    str(path.relative_to(SRC))
    for package in ("wimse", "integrations")
    for path in (SRC / package).rglob("*.py")
    if path.name not in SENDER_SIDE
)
_LITERALS = [
    re.compile(r"""\b_(?:wit_)?fail\(\s*["']([a-z0-9_]+)["']"""),
    re.compile(r"""\bcode\s*=\s*["']([a-z0-9_]+)["']"""),
    # wit.decode_typed(..., codes=("wpt_bad_typ", "wpt_bad_alg")): each code of the pair
    re.compile(r"""\bcodes=\(\s*["']([a-z0-9_]+)["']"""),
    re.compile(r"""\bcodes=\(\s*["'][a-z0-9_]+["'],\s*["']([a-z0-9_]+)["']"""),
]
#: codes not tied to one variant: request-level refusals shared by both.
GENERIC_REQUEST_CODES = frozenset(
    {"unsafe_request_target", "ambiguous_proof", "variant_not_accepted"}
)


def _class_codes() -> set[str]:
    # Import every module so all WimseError subclasses exist, then walk them.

    codes: set[str] = set()
    todo = [WimseError]
    while todo:
        cls = todo.pop()
        codes.add(cls.code)
        todo.extend(cls.__subclasses__())
    return codes


def _source_codes() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for name in MODULES:
        text = (SRC / name).read_text()
        for pattern in _LITERALS:
            for code in pattern.findall(text):
                found.setdefault(code, set()).add(name)
    return found


def published() -> frozenset[str]:
    return (
        WPT_ERROR_CODES
        | HTTPSIG_ERROR_CODES
        | WIT_ERROR_CODES
        | GENERIC_REQUEST_CODES
        | frozenset(_class_codes())
    )


def test_the_scan_sees_the_literals() -> None:
    found = _source_codes()
    # one from each kind of literal, so a broken regex cannot pass vacuously
    assert "wpt_bad_audience" in found and "wit_bad_signature" in found
    assert "content_digest_missing" in found and "body_too_large" in found
    assert len(found) > 60


def test_every_raised_code_is_published() -> None:
    allowed = published()
    unpublished = {
        code: sorted(where)
        for code, where in _source_codes().items()
        # sender-side mint errors (status 500) describe our own mistakes
        if code not in allowed and "_mint_" not in code
    }
    assert unpublished == {}


@pytest.mark.parametrize("codes", [WPT_ERROR_CODES, HTTPSIG_ERROR_CODES, WIT_ERROR_CODES])
def test_published_codes_are_actually_raised(codes: frozenset[str]) -> None:
    """No stale entries: each published code appears as a literal somewhere
    (``wpt_malformed`` / ``wpt_too_large`` are made from the ``wpt`` prefix
    by the shared JOSE decoder)."""
    found = set(_source_codes())
    derived = {"wpt_malformed", "wpt_too_large", "wit_malformed", "wit_too_large"}
    assert codes - found - derived == set()


def test_two_wits_have_one_code_on_both_paths() -> None:
    assert "wit_multiple" in WIT_ERROR_CODES
    assert "wit_duplicated" not in HTTPSIG_ERROR_CODES | WIT_ERROR_CODES
    assert "wit_duplicated" not in _source_codes()
