"""Numbers that would switch a time check off, and trust bundles given the
short way (audit of issue 7: item 11's finite-but-huge values, a single
TrustBundle handed to the WIT / WPT verifiers)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from wimse_rig import ca_bundles, mint_example_wit

from custos._numbers import InvalidNumberError
from custos.bundle import BundleSet
from custos.errors import CustosError
from custos.identity import SpiffeId
from custos.keys import MemoryKeyStore
from custos.wimse.http.message import HttpMessage
from custos.wimse.httpsig import HttpSignatureVerifier
from custos.wimse.replay import MemoryReplayCache
from custos.wimse.wit import (
    MAX_LEEWAY,
    MAX_PROOF_LIFETIME,
    MAX_WIT_TTL,
    WitMintError,
    WitVerifier,
    mint_wit,
    verify_wit,
)
from custos.wimse.wpt import WptVerifier

ORIGIN = "https://api.example.org"
CALLER = SpiffeId.parse("spiffe://example.org/ns/shop/sa/web")


@pytest.fixture(scope="module")
def store() -> MemoryKeyStore:
    s = MemoryKeyStore()
    s.create("ca", "ES256")
    s.create("client", "ES256")
    return s


@pytest.fixture(scope="module")
def bundles(store: MemoryKeyStore) -> BundleSet:
    return ca_bundles(store)


def test_the_bounds_are_the_documented_ones() -> None:
    assert (MAX_LEEWAY, MAX_PROOF_LIFETIME, MAX_WIT_TTL) == (3600, 86400, 365 * 86400)


# -- finite but huge: as good as infinity, so refused ------------------------------------

HUGE = [1e15, 10**30, timedelta(days=10_000)]


@pytest.mark.parametrize("value", HUGE)
def test_wit_leeway_is_bounded(bundles: BundleSet, value: object) -> None:
    with pytest.raises(InvalidNumberError):
        WitVerifier(bundles, leeway=value)  # type: ignore[arg-type]
    with pytest.raises(InvalidNumberError):
        verify_wit("a.b.c", bundles, leeway=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", HUGE)
@pytest.mark.parametrize("name", ["leeway", "max_ttl"])
def test_wpt_leeway_and_max_ttl_are_bounded(bundles: BundleSet, name: str, value: object) -> None:
    kwargs: dict[str, Any] = {name: value}
    with pytest.raises(InvalidNumberError):
        WptVerifier(bundles, audiences=[ORIGIN], replay=MemoryReplayCache(), **kwargs)


@pytest.mark.parametrize("value", HUGE)
@pytest.mark.parametrize("name", ["leeway", "max_age"])
def test_httpsig_leeway_and_max_age_are_bounded(
    bundles: BundleSet, name: str, value: object
) -> None:
    kwargs: dict[str, Any] = {name: value}
    with pytest.raises(InvalidNumberError):
        HttpSignatureVerifier(WitVerifier(bundles), MemoryReplayCache(), [ORIGIN], **kwargs)


@pytest.mark.parametrize("value", HUGE)
def test_mint_wit_ttl_is_bounded(store: MemoryKeyStore, value: object) -> None:
    # Before: ttl=1e15 minted a WIT that verified (for ~30 million years).
    with pytest.raises(WitMintError):
        mint_wit(
            store.get("ca"),
            subject=CALLER,
            workload_public_jwk=store.public_jwk("client"),
            ttl=value,  # type: ignore[arg-type]
        )


def test_the_bounds_themselves_are_accepted(store: MemoryKeyStore, bundles: BundleSet) -> None:
    cache = MemoryReplayCache()
    assert WitVerifier(bundles, leeway=MAX_LEEWAY).leeway == MAX_LEEWAY
    wpt = WptVerifier(
        bundles, audiences=[ORIGIN], replay=cache, leeway=MAX_LEEWAY, max_ttl=MAX_PROOF_LIFETIME
    )
    assert (wpt.leeway, wpt.max_ttl) == (MAX_LEEWAY, MAX_PROOF_LIFETIME)
    sig = HttpSignatureVerifier(
        WitVerifier(bundles), cache, [ORIGIN], max_age=MAX_PROOF_LIFETIME, leeway=MAX_LEEWAY
    )
    assert (sig.max_age, sig.leeway) == (MAX_PROOF_LIFETIME, MAX_LEEWAY)
    wit = mint_wit(
        store.get("ca"),
        subject=CALLER,
        workload_public_jwk=store.public_jwk("client"),
        ttl=timedelta(days=365),
        kid="ca-1",
    )
    assert WitVerifier(bundles).verify(wit).subject == CALLER


# -- one TrustBundle where a BundleSet goes ----------------------------------------------


def test_a_single_trust_bundle_works_in_the_wit_verifier(
    store: MemoryKeyStore, bundles: BundleSet
) -> None:
    # Before: accepted, then AttributeError ('TrustBundle' has no 'get') per request.
    (bundle,) = (bundles.get(td) for td in bundles.trust_domains())
    assert bundle is not None
    wit = mint_example_wit(store, CALLER, "client")
    assert WitVerifier(bundle).verify(wit).subject == CALLER
    assert verify_wit(wit, bundle).subject == CALLER  # type: ignore[arg-type]


def test_a_single_trust_bundle_works_in_the_wpt_verifier(
    store: MemoryKeyStore, bundles: BundleSet
) -> None:
    from custos.wimse.wpt import create_wpt

    (bundle,) = (bundles.get(td) for td in bundles.trust_domains())
    assert bundle is not None
    wit = mint_example_wit(store, CALLER, "client")
    wpt = create_wpt(store.get("client"), wit, ORIGIN + "/pay")
    request = HttpMessage.request(
        "GET",
        "/pay",
        [
            ("Host", "api.example.org"),
            ("Workload-Identity-Token", wit),
            ("Authorization", f"WPT {wpt}"),
        ],
    )
    verifier = WptVerifier(bundle, audiences=[ORIGIN], replay=MemoryReplayCache())
    assert verifier.verify(request).wit.subject == CALLER


@pytest.mark.parametrize("value", [{"example.org": "x"}, [], "example.org", 42, None])
def test_anything_else_as_bundles_is_refused_when_built(value: object) -> None:
    with pytest.raises(CustosError) as info:
        WitVerifier(value)  # type: ignore[arg-type]
    assert isinstance(info.value, TypeError)
    assert info.value.code == "bundles_invalid"
    if value is not None:  # None means "use wit_verifier" in WptVerifier
        with pytest.raises(CustosError):
            WptVerifier(value, audiences=[ORIGIN], replay=MemoryReplayCache())  # type: ignore[arg-type]
