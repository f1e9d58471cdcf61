"""Which entries an agent gets: its children and descendants, those of its node
aliases, join-token aliases, cycles, the depth cap, expiry — and never another
agent's entries.  Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import time

from custos.identity import SpiffeId
from custos.server.datastore import Datastore
from custos.server.datastore.records import Agent
from custos.server.entitlement import MAX_DEPTH, alias_ids, entries_for_agent

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
