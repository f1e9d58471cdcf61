"""The issuer's remembered entitlement (decision 0127): every way an agent's entries
change must reach the very next call — a created, updated, deleted or expired entry, a
change made through another server's datastore, a new node selector, an eviction or a
ban — and an unchanged feed must not cost the walk again. SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import event

from custos.identity import SpiffeId
from custos.server.datastore import Datastore
from custos.server.datastore.records import Agent
from custos.server.entitlement import Entitlement, entries_for_agent

TD = "example.org"
SERVER = SpiffeId.parse(f"spiffe://{TD}/custos/server")
A1 = f"spiffe://{TD}/custos/agent/join_token/a1"
A2 = f"spiffe://{TD}/custos/agent/join_token/a2"


def _agent(store: Datastore, agent_id: str, selectors: list[str] | None = None) -> Agent:
    return store.agents.attested(
        agent_id,
        attestor="join_token",
        selectors=selectors or [],
        serial="1",
        expires_at=time.time() + 3600,
    )


def _ids(entries: list) -> set[str]:  # type: ignore[type-arg]
    return {str(e.spiffe_id) for e in entries}


@pytest.fixture
def other_server(store_url: str, store: Datastore) -> Iterator[Datastore]:
    """A second server's datastore on the same database."""
    with Datastore.open(store_url, trust_domain=TD) as ds:
        yield ds


def test_created_entry_reaches_the_next_call(store: Datastore) -> None:
    a1 = _agent(store, A1)
    entitled = Entitlement(store, SERVER)
    store.entries.create(f"spiffe://{TD}/w1", A1, ["unix:uid:1"])
    assert _ids(entitled(a1)) == {f"spiffe://{TD}/w1"}
    store.entries.create(f"spiffe://{TD}/w2", A1, ["unix:uid:2"])
    assert _ids(entitled(a1)) == {f"spiffe://{TD}/w1", f"spiffe://{TD}/w2"}


def test_deleted_entry_is_refused_at_the_next_call(store: Datastore) -> None:
    """The attack: an operator deletes a workload's entry; a remembered answer
    must not keep issuing for it."""
    a1 = _agent(store, A1)
    entitled = Entitlement(store, SERVER)
    gone = store.entries.create(f"spiffe://{TD}/gone", A1, ["unix:uid:1"])
    store.entries.create(f"spiffe://{TD}/kept", A1, ["unix:uid:2"])
    assert len(entitled(a1)) == 2
    store.entries.delete(gone.id)
    assert _ids(entitled(a1)) == {f"spiffe://{TD}/kept"}


def test_entry_moved_to_another_agent_leaves(store: Datastore) -> None:
    a1 = _agent(store, A1)
    a2 = _agent(store, A2)
    entitled = Entitlement(store, SERVER)
    entry = store.entries.create(f"spiffe://{TD}/w", A1, ["unix:uid:1"])
    assert _ids(entitled(a1)) == {f"spiffe://{TD}/w"}
    assert entitled(a2) == []
    store.entries.update(dataclasses.replace(entry, parent_id=SpiffeId.parse(A2)))
    assert entitled(a1) == []
    assert _ids(entitled(a2)) == {f"spiffe://{TD}/w"}


def test_change_through_another_server_is_seen(store: Datastore, other_server: Datastore) -> None:
    a1 = _agent(store, A1)
    entitled = Entitlement(store, SERVER)
    entry = other_server.entries.create(f"spiffe://{TD}/w", A1, ["unix:uid:1"])
    assert _ids(entitled(a1)) == {f"spiffe://{TD}/w"}
    other_server.entries.delete(entry.id)
    assert entitled(a1) == []


def test_entry_expiring_between_calls_leaves_with_its_children(store: Datastore) -> None:
    """No write marks an expiry: the remembered walk ends at its first entry's
    expiry, and the entries below it go with it."""
    a1 = _agent(store, A1)
    entitled = Entitlement(store, SERVER)
    soon = time.time() + 1.0
    store.entries.create(f"spiffe://{TD}/group", A1, ["unix:uid:1"], expires_at=soon)
    store.entries.create(f"spiffe://{TD}/child", f"spiffe://{TD}/group", ["unix:uid:2"])
    store.entries.create(f"spiffe://{TD}/long", A1, ["unix:uid:3"])
    assert len(entitled(a1)) == 3
    time.sleep(max(0.0, soon - time.time()) + 0.05)
    assert _ids(entitled(a1)) == {f"spiffe://{TD}/long"}


def test_expiring_node_alias_ends_the_remembered_walk(store: Datastore) -> None:
    a1 = _agent(store, A1, ["aws:region:eu"])
    entitled = Entitlement(store, SERVER)
    soon = time.time() + 1.0
    store.entries.create(f"spiffe://{TD}/nodes/eu", SERVER, ["aws:region:eu"], expires_at=soon)
    store.entries.create(f"spiffe://{TD}/web", f"spiffe://{TD}/nodes/eu", ["unix:uid:1"])
    assert _ids(entitled(a1)) == {f"spiffe://{TD}/web"}
    time.sleep(max(0.0, soon - time.time()) + 0.05)
    assert entitled(a1) == []


def test_new_node_selectors_change_the_aliases(store: Datastore) -> None:
    """A re-attested agent with other node selectors is another question: the
    walk remembered for its old selectors does not answer it."""
    eu = _agent(store, A1, ["aws:region:eu"])
    entitled = Entitlement(store, SERVER)
    store.entries.create(f"spiffe://{TD}/nodes/eu", SERVER, ["aws:region:eu"])
    store.entries.create(f"spiffe://{TD}/eu-web", f"spiffe://{TD}/nodes/eu", ["unix:uid:1"])
    assert _ids(entitled(eu)) == {f"spiffe://{TD}/eu-web"}
    us = _agent(store, A1, ["aws:region:us"])
    assert entitled(us) == []


def test_evicted_or_banned_agent_gets_nothing_after_a_remembered_walk(store: Datastore) -> None:
    a1 = _agent(store, A1)
    entitled = Entitlement(store, SERVER)
    store.entries.create(f"spiffe://{TD}/w1", A1, ["unix:uid:1"])
    assert entitled(a1) != []
    assert entitled(store.agents.evict(A1)) == []
    assert entitled(store.agents.ban(A1)) == []


def test_unchanged_feed_costs_one_statement(store: Datastore) -> None:
    """What it is for: the second call reads the feed's position and nothing else."""
    a1 = _agent(store, A1)
    for i in range(5):
        store.entries.create(f"spiffe://{TD}/w{i}", A1, [f"unix:uid:{i}"])
    entitled = Entitlement(store, SERVER)
    statements: list[str] = []

    def count(*args: object) -> None:
        if not str(args[2]).startswith("BEGIN"):  # SQLite's transaction opening
            statements.append(str(args[2]))

    engine = store._engine  # instrumented only: the count is the behaviour under test
    event.listen(engine, "before_cursor_execute", count)
    try:
        first = entitled(a1)
        walked = len(statements)
        statements.clear()
        second = entitled(a1)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert second == first == entries_for_agent(store, a1, SERVER)
    assert walked > 1
    assert len(statements) == 1 and "entry_changes" in statements[0]


def test_bounded_and_still_right_past_the_bound(store: Datastore) -> None:
    agents = [_agent(store, f"spiffe://{TD}/custos/agent/join_token/n{i}") for i in range(4)]
    for i, agent in enumerate(agents):
        store.entries.create(f"spiffe://{TD}/w{i}", agent.id, ["unix:uid:1"])
    entitled = Entitlement(store, SERVER, max_agents=2)
    for _ in range(3):
        for i, agent in enumerate(agents):
            assert _ids(entitled(agent)) == {f"spiffe://{TD}/w{i}"}
    assert len(entitled._walked) == 2  # the bound itself (nothing public to ask)


def test_returned_list_is_the_callers_own(store: Datastore) -> None:
    a1 = _agent(store, A1)
    store.entries.create(f"spiffe://{TD}/w1", A1, ["unix:uid:1"])
    entitled = Entitlement(store, SERVER)
    first = entitled(a1)
    first.clear()
    assert _ids(entitled(a1)) == {f"spiffe://{TD}/w1"}
