"""Registration entries: CRUD, selector queries, optimistic concurrency,
validation before any write, and the change feed."""

from __future__ import annotations

import math
import threading
from dataclasses import replace

import pytest

from custos._numbers import InvalidNumberError
from custos.errors import CustosError
from custos.identity import InvalidIdentifierError, Selector
from custos.server.datastore import (
    Datastore,
    EntryExistsError,
    InvalidEntryError,
    NotFoundError,
    RevisionConflictError,
)

from .conftest import AGENT

WL = "spiffe://example.org/web"


def test_create_get_roundtrip(store: Datastore) -> None:
    e = store.entries.create(
        WL,
        AGENT,
        ["unix:uid:1000", Selector("k8s", "ns:prod")],
        x509_svid_ttl=600,
        jwt_svid_ttl=60,
        wit_ttl=120,
        dns_names=["Web.Example.org"],
        key_custody="tpm",
        hint="web",
        admin=True,
        downstream=False,
        expires_at=2_000_000_000,
    )
    got = store.entries.get(e.id)
    assert got == e
    assert got.revision == 1
    assert str(got.spiffe_id) == WL
    assert got.selectors == (Selector("k8s", "ns:prod"), Selector("unix", "uid:1000"))
    assert got.dns_names == ("web.example.org",)
    assert (got.key_custody, got.admin, got.x509_svid_ttl) == ("tpm", True, 600.0)
    assert store.entries.count() == 1


def test_get_unknown_is_not_found(store: Datastore) -> None:
    with pytest.raises(NotFoundError) as err:
        store.entries.get("nope")
    assert err.value.code == "entry_not_found"


def test_list_by_parent_and_selectors(store: Datastore) -> None:
    other_parent = "spiffe://example.org/spire/agent/join_token/n2"
    a = store.entries.create("spiffe://example.org/a", AGENT, ["unix:uid:1"])
    b = store.entries.create("spiffe://example.org/b", AGENT, ["unix:uid:1", "unix:gid:2"])
    c = store.entries.create("spiffe://example.org/c", other_parent, ["unix:uid:3"])
    assert {e.id for e in store.entries.list()} == {a.id, b.id, c.id}
    assert {e.id for e in store.entries.list(parent_id=AGENT)} == {a.id, b.id}
    assert [e.id for e in store.entries.list(spiffe_id="spiffe://example.org/c")] == [c.id]
    by = store.entries.list
    assert [e.id for e in by(selectors=["unix:uid:1"])] == [a.id]
    assert {e.id for e in by(selectors=["unix:uid:1", "unix:gid:2"], match="subset")} == {
        a.id,
        b.id,
    }
    assert [e.id for e in by(selectors=["unix:gid:2"], match="superset")] == [b.id]
    assert {e.id for e in by(selectors=["unix:uid:1", "unix:uid:3"], match="any")} == {
        a.id,
        b.id,
        c.id,
    }
    assert by(selectors=["unix:uid:9"], match="any") == []
    with pytest.raises(InvalidEntryError):
        by(selectors=["unix:uid:1"], match="most")  # type: ignore[arg-type]


def test_update_bumps_revision_and_rewrites_selectors(store: Datastore) -> None:
    e = store.entries.create(WL, AGENT, ["unix:uid:1"])
    new = store.entries.update(replace(e, selectors=(Selector("unix", "uid:2"),), hint="moved"))
    assert new.revision == 2
    assert store.entries.get(e.id) == new
    assert store.entries.list(selectors=["unix:uid:1"]) == []
    assert [x.id for x in store.entries.list(selectors=["unix:uid:2"])] == [e.id]


def test_stale_update_conflicts_and_writes_nothing(store: Datastore) -> None:
    e = store.entries.create(WL, AGENT, ["unix:uid:1"])
    first = store.entries.update(replace(e, hint="first"))
    with pytest.raises(RevisionConflictError) as err:
        store.entries.update(replace(e, hint="second", selectors=(Selector("x", "y"),)))
    assert err.value.code == "revision_conflict"
    assert store.entries.get(e.id) == first
    with pytest.raises(RevisionConflictError):
        store.entries.delete(e.id, revision=1)
    assert store.entries.count() == 1


def test_concurrent_updates_from_one_revision_exactly_one_wins(store: Datastore) -> None:
    e = store.entries.create(WL, AGENT, ["unix:uid:1"])
    barrier = threading.Barrier(6)
    outcomes: list[str] = []

    def writer(n: int) -> None:
        barrier.wait()
        try:
            store.entries.update(replace(e, hint=f"w{n}"))
            outcomes.append("won")
        except RevisionConflictError:
            outcomes.append("conflict")

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["conflict"] * 5 + ["won"]
    assert store.entries.get(e.id).revision == 2


def test_an_identical_entry_is_refused_on_create(store: Datastore) -> None:
    # SPIRE's "entry already exists": same SPIFFE ID, parent and selector set.
    first = store.entries.create(WL, AGENT, ["unix:uid:1", "k8s:ns:prod"], hint="a")
    with pytest.raises(EntryExistsError) as err:
        # Other order, other settings: still the same identity for the same workloads.
        store.entries.create(WL, AGENT, ["k8s:ns:prod", "unix:uid:1"], hint="b", wit_ttl=60)
    assert err.value.code == "entry_exists"
    assert first.id in err.value.message
    assert store.entries.count() == 1
    assert store.entries.last_change_seq() == first.change_seq  # nothing written
    # One selector more or less, another parent or ID: a different entry.
    store.entries.create(WL, AGENT, ["unix:uid:1"])
    store.entries.create(WL, AGENT, ["unix:uid:1", "k8s:ns:prod", "unix:gid:2"])
    store.entries.create(WL, "spiffe://example.org/spire/agent/join_token/n2", ["unix:uid:1"])
    store.entries.create("spiffe://example.org/web2", AGENT, ["unix:uid:1"])
    assert store.entries.count() == 5


def test_an_update_that_makes_an_entry_identical_is_refused(store: Datastore) -> None:
    store.entries.create(WL, AGENT, ["unix:uid:1"])
    other = store.entries.create(WL, AGENT, ["unix:uid:2"])
    with pytest.raises(EntryExistsError):
        store.entries.update(replace(other, selectors=(Selector("unix", "uid:1"),)))
    assert store.entries.get(other.id) == other
    # Changing anything else of an entry keeps it (it is not a duplicate of itself).
    assert store.entries.update(replace(other, hint="x")).revision == 2


def test_identical_creates_at_once_from_two_servers_exactly_one_wins(store_url: str) -> None:
    # Two Datastore objects, two connection pools: as two servers on one database.
    with (
        Datastore.open(store_url, trust_domain="example.org") as one,
        Datastore.open(store_url, trust_domain="example.org") as two,
    ):
        barrier = threading.Barrier(6)
        outcomes: list[str] = []

        def writer(n: int) -> None:
            ds = (one, two)[n % 2]
            barrier.wait()
            try:
                ds.entries.create(WL, AGENT, ["unix:uid:1"])
                outcomes.append("created")
            except EntryExistsError:
                outcomes.append("exists")

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcomes) == ["created"] + ["exists"] * 5
        assert one.entries.count() == 1


def test_update_and_delete_of_unknown_entry(store: Datastore) -> None:
    e = store.entries.create(WL, AGENT, ["unix:uid:1"])
    store.entries.delete(e.id)
    assert store.entries.count() == 0
    with pytest.raises(NotFoundError):
        store.entries.update(e)
    with pytest.raises(NotFoundError):
        store.entries.delete(e.id)


BAD_ENTRIES: list[tuple[dict[str, object], type[CustosError], str]] = [
    ({"spiffe_id": "spiffe://other.org/web"}, InvalidEntryError, "wrong_trust_domain"),
    ({"parent_id": "spiffe://other.org/spire/agent/x"}, InvalidEntryError, "wrong_trust_domain"),
    ({"spiffe_id": "spiffe://example.org/a//b"}, InvalidIdentifierError, ""),
    ({"spiffe_id": "https://example.org/web"}, InvalidIdentifierError, ""),
    ({"spiffe_id": 42}, InvalidIdentifierError, ""),
    ({"selectors": ["no-colon"]}, InvalidIdentifierError, ""),
    ({"selectors": ["unix:uid\x00:1"]}, InvalidIdentifierError, ""),
    ({"selectors": []}, InvalidEntryError, "no_selectors"),
    ({"selectors": "unix:uid:1"}, InvalidEntryError, "invalid_selectors"),
    ({"x509_svid_ttl": 0}, InvalidNumberError, "invalid_number"),
    ({"jwt_svid_ttl": -5}, InvalidNumberError, "invalid_number"),
    ({"wit_ttl": math.nan}, InvalidNumberError, "invalid_number"),
    ({"wit_ttl": math.inf}, InvalidNumberError, "invalid_number"),
    ({"x509_svid_ttl": True}, InvalidNumberError, "invalid_number"),
    ({"x509_svid_ttl": "60"}, InvalidNumberError, "invalid_number"),
    ({"key_custody": "hsm"}, InvalidEntryError, "unknown_key_custody"),
    ({"dns_names": ["bad_name.example.org"]}, InvalidEntryError, "invalid_dns_name"),
    ({"dns_names": "one.example.org"}, InvalidEntryError, "invalid_dns_name"),
    ({"hint": "x" * 2000}, InvalidEntryError, "invalid_hint"),
    ({"admin": "yes"}, InvalidEntryError, "invalid_flag"),
    ({"expires_at": math.nan}, InvalidNumberError, "invalid_number"),
]


@pytest.mark.parametrize(("change", "error", "code"), BAD_ENTRIES)
def test_invalid_entry_is_refused_before_any_write(
    store: Datastore, change: dict[str, object], error: type[CustosError], code: str
) -> None:
    args: dict[str, object] = {"spiffe_id": WL, "parent_id": AGENT, "selectors": ["unix:uid:1"]}
    args.update(change)
    with pytest.raises(error) as err:
        store.entries.create(**args)  # type: ignore[arg-type]
    if code:
        assert err.value.code == code
    assert store.entries.count() == 0
    assert store.entries.changes_since(0) == []


def test_invalid_update_writes_nothing(store: Datastore) -> None:
    e = store.entries.create(WL, AGENT, ["unix:uid:1"])
    with pytest.raises(InvalidNumberError):
        store.entries.update(replace(e, x509_svid_ttl=-1.0))
    with pytest.raises(InvalidEntryError):
        store.entries.update(replace(e, key_custody="floppy"))
    assert store.entries.get(e.id) == e
    assert len(store.entries.changes_since(0)) == 1


def test_change_feed_is_monotonic_and_names_each_write(store: Datastore) -> None:
    start = store.entries.last_change_seq()
    a = store.entries.create("spiffe://example.org/a", AGENT, ["unix:uid:1"])
    b = store.entries.create("spiffe://example.org/b", AGENT, ["unix:uid:2"])
    a2 = store.entries.update(replace(a, hint="h"))
    store.entries.delete(b.id)
    feed = store.entries.changes_since(start)
    assert [(c.entry_id, c.op) for c in feed] == [
        (a.id, "create"),
        (b.id, "create"),
        (a.id, "update"),
        (b.id, "delete"),
    ]
    seqs = [c.seq for c in feed]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4
    assert a2.change_seq == seqs[2]
    assert store.entries.changes_since(seqs[2]) == feed[3:]
    assert store.entries.last_change_seq() == seqs[-1]
