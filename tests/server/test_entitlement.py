"""Which entries an agent gets: its children and descendants, those of its node
aliases, join-token aliases, cycles, the depth cap, expiry — and never another
agent's entries. Then the issuer's remembered entitlement (decision 0127): every way
an agent's entries change reaches the very next call, and an unchanged feed does not
cost the walk again. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import event

from custos.identity import SpiffeId
from custos.server.datastore import Datastore
from custos.server.datastore.records import Agent
from custos.server.entitlement import MAX_DEPTH, Entitlement, alias_ids, entries_for_agent

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


def test_direct_children_only_of_this_agent(store: Datastore) -> None:
    a1 = _agent(store, A1)
    _agent(store, A2)
    store.entries.create(f"spiffe://{TD}/w1", A1, ["unix:uid:1"])
    store.entries.create(f"spiffe://{TD}/w2", A1, ["unix:uid:2"])
    store.entries.create(f"spiffe://{TD}/other", A2, ["unix:uid:1"])
    got = entries_for_agent(store, a1, SERVER)
    assert _ids(got) == {f"spiffe://{TD}/w1", f"spiffe://{TD}/w2"}
    assert [e.id for e in got] == sorted(e.id for e in got)


def test_descendants_are_included(store: Datastore) -> None:
    a1 = _agent(store, A1)
    store.entries.create(f"spiffe://{TD}/group", A1, ["unix:uid:1"])
    store.entries.create(f"spiffe://{TD}/child", f"spiffe://{TD}/group", ["unix:uid:2"])
    store.entries.create(f"spiffe://{TD}/grandchild", f"spiffe://{TD}/child", ["unix:uid:3"])
    assert _ids(entries_for_agent(store, a1, SERVER)) == {
        f"spiffe://{TD}/group",
        f"spiffe://{TD}/child",
        f"spiffe://{TD}/grandchild",
    }


def test_node_alias_by_selectors(store: Datastore) -> None:
    a1 = _agent(store, A1, ["aws:region:eu", "aws:tag:web"])
    a2 = _agent(store, A2, ["aws:region:us"])
    alias = f"spiffe://{TD}/nodes/eu-web"
    store.entries.create(alias, SERVER, ["aws:region:eu", "aws:tag:web"])
    # an alias needing a selector the agent lacks does not apply
    store.entries.create(f"spiffe://{TD}/nodes/eu-db", SERVER, ["aws:region:eu", "aws:tag:db"])
    store.entries.create(f"spiffe://{TD}/web", alias, ["unix:uid:1"])
    store.entries.create(f"spiffe://{TD}/db", f"spiffe://{TD}/nodes/eu-db", ["unix:uid:1"])
    assert [str(a) for a in alias_ids(store, a1, SERVER)] == [alias]
    # the alias entry itself names nodes, not a workload: not sent
    assert _ids(entries_for_agent(store, a1, SERVER)) == {f"spiffe://{TD}/web"}
    assert entries_for_agent(store, a2, SERVER) == []


def test_agent_without_selectors_gets_no_alias(store: Datastore) -> None:
    a1 = _agent(store, A1)
    alias = f"spiffe://{TD}/nodes/all"
    store.entries.create(alias, SERVER, ["aws:region:eu"])
    store.entries.create(f"spiffe://{TD}/web", alias, ["unix:uid:1"])
    assert entries_for_agent(store, a1, SERVER) == []


def test_join_token_alias(store: Datastore) -> None:
    """`token generate --spiffe-id X` makes X a child of the agent with the
    selector spiffe_id:<agent id> (as SPIRE does); entries under X follow."""
    a1 = _agent(store, A1)
    node = f"spiffe://{TD}/node/rack7"
    store.entries.create(node, A1, [f"spiffe_id:{A1}"])
    store.entries.create(f"spiffe://{TD}/rack7/web", node, ["unix:uid:1"])
    assert _ids(entries_for_agent(store, a1, SERVER)) == {node, f"spiffe://{TD}/rack7/web"}
    assert entries_for_agent(store, _agent(store, A2), SERVER) == []


def test_cycle_is_walked_once(store: Datastore) -> None:
    a1 = _agent(store, A1)
    x, y = f"spiffe://{TD}/x", f"spiffe://{TD}/y"
    store.entries.create(x, A1, ["unix:uid:1"])
    store.entries.create(y, x, ["unix:uid:2"])
    store.entries.create(x, y, ["unix:uid:3"])  # y → x: a cycle x → y → x
    store.entries.create(A1, y, ["unix:uid:4"])  # and back to the agent itself
    got = entries_for_agent(store, a1, SERVER)
    assert len(got) == 4
    assert len({e.id for e in got}) == 4


def test_depth_cap(store: Datastore) -> None:
    a1 = _agent(store, A1)
    parent = A1
    for level in range(1, MAX_DEPTH + 3):
        child = f"spiffe://{TD}/level/{level}"
        store.entries.create(child, parent, ["unix:uid:1"])
        parent = child
    got = _ids(entries_for_agent(store, a1, SERVER))
    assert got == {f"spiffe://{TD}/level/{n}" for n in range(1, MAX_DEPTH + 1)}


def test_expired_entries_and_their_children_left_out(store: Datastore) -> None:
    a1 = _agent(store, A1, ["aws:region:eu"])
    past = time.time() - 10
    store.entries.create(f"spiffe://{TD}/live", A1, ["unix:uid:1"], expires_at=time.time() + 600)
    store.entries.create(f"spiffe://{TD}/dead", A1, ["unix:uid:2"], expires_at=past)
    store.entries.create(f"spiffe://{TD}/under-dead", f"spiffe://{TD}/dead", ["unix:uid:3"])
    store.entries.create(f"spiffe://{TD}/nodes/old", SERVER, ["aws:region:eu"], expires_at=past)
    store.entries.create(f"spiffe://{TD}/under-old", f"spiffe://{TD}/nodes/old", ["unix:uid:1"])
    assert _ids(entries_for_agent(store, a1, SERVER)) == {f"spiffe://{TD}/live"}


def test_evicted_or_banned_agent_gets_nothing(store: Datastore) -> None:
    _agent(store, A1)
    store.entries.create(f"spiffe://{TD}/w1", A1, ["unix:uid:1"])
    assert entries_for_agent(store, store.agents.get(A1), SERVER) != []
    assert entries_for_agent(store, store.agents.evict(A1), SERVER) == []
    assert entries_for_agent(store, store.agents.ban(A1), SERVER) == []


def test_server_children_are_not_everyones(store: Datastore) -> None:
    """An entry parented to the server with selectors nobody has, and an
    agent whose alias walk leads back to the server ID, get nothing extra."""
    a1 = _agent(store, A1, ["aws:region:eu"])
    alias = f"spiffe://{TD}/nodes/eu"
    store.entries.create(alias, SERVER, ["aws:region:eu"])
    store.entries.create(str(SERVER), alias, ["unix:uid:1"])  # a loop through the server ID
    store.entries.create(f"spiffe://{TD}/nodes/us", SERVER, ["aws:region:us"])
    store.entries.create(f"spiffe://{TD}/us-web", f"spiffe://{TD}/nodes/us", ["unix:uid:1"])
    assert _ids(entries_for_agent(store, a1, SERVER)) == {str(SERVER)}


def test_list_by_parents_batches(store: Datastore) -> None:
    parents = [f"spiffe://{TD}/p/{n}" for n in range(1, 1201)]
    for n in (1, 600, 1200):
        store.entries.create(f"spiffe://{TD}/c/{n}", parents[n - 1], ["unix:uid:1"])
    got = store.entries.list_by_parents(parents)
    assert _ids(got.entries) == {f"spiffe://{TD}/c/{n}" for n in (1, 600, 1200)}
    assert got.parents == frozenset()
    assert store.entries.list_by_parents([]) == ([], frozenset())


def test_list_by_parents_says_which_entries_are_parents(store: Datastore) -> None:
    top = f"spiffe://{TD}/top"
    store.entries.create(f"spiffe://{TD}/group", top, ["unix:uid:1"])
    store.entries.create(f"spiffe://{TD}/leaf", top, ["unix:uid:2"])
    store.entries.create(f"spiffe://{TD}/under", f"spiffe://{TD}/group", ["unix:uid:3"])
    got = store.entries.list_by_parents([top])
    assert _ids(got.entries) == {f"spiffe://{TD}/group", f"spiffe://{TD}/leaf"}
    assert got.parents == {SpiffeId.parse(f"spiffe://{TD}/group")}


# -- the remembered entitlement (decision 0127) -----------------------------------------


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
