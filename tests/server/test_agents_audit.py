"""Agents (attest, list, show, evict, ban) and the audit trail."""

from __future__ import annotations

import time

import pytest

from custos.errors import CustosError
from custos.identity import Selector
from custos.server.datastore import Datastore, DatastoreError, InvalidEntryError, NotFoundError

from .conftest import AGENT


def test_attest_list_show(store: Datastore) -> None:
    a = store.agents.attested(
        AGENT, attestor="join_token", selectors=["tpm:ek:abc"], serial="01", expires_at=5000.0
    )
    assert store.agents.get(AGENT) == a
    assert store.agents.list() == [a]
    again = store.agents.attested(
        AGENT, attestor="join_token", selectors=["tpm:ek:abc"], serial="02", expires_at=6000.0
    )
    assert store.agents.get(AGENT).serial == "02"
    assert store.agents.list() == [again]


def test_evict_then_reattest_clears_eviction(store: Datastore) -> None:
    store.agents.attested(AGENT, attestor="tpm", selectors=[], serial="1", expires_at=1.0)
    assert store.agents.evict(AGENT).evicted
    assert not store.agents.attested(
        AGENT, attestor="tpm", selectors=[], serial="2", expires_at=1.0
    ).evicted


def test_evict_and_ban_set_updated_at(store: Datastore) -> None:
    store.agents.attested(
        AGENT, attestor="tpm", selectors=[], serial="1", expires_at=1.0, now=100.0
    )
    evicted = store.agents.evict(AGENT, now=200.0)
    assert evicted.updated_at == 200.0 == store.agents.get(AGENT).updated_at
    before = time.time()
    banned = store.agents.ban(AGENT)  # the clock when not given
    assert banned.updated_at >= before
    assert store.agents.get(AGENT).updated_at == banned.updated_at


def test_banned_agent_cannot_attest_again(store: Datastore) -> None:
    store.agents.attested(AGENT, attestor="tpm", selectors=[], serial="1", expires_at=1.0)
    banned = store.agents.ban(AGENT)
    assert banned.banned and banned.evicted
    with pytest.raises(DatastoreError) as err:
        store.agents.attested(AGENT, attestor="tpm", selectors=[], serial="2", expires_at=1.0)
    assert err.value.code == "agent_banned"
    assert store.agents.get(AGENT).serial == "1"


def test_unknown_agent(store: Datastore) -> None:
    with pytest.raises(NotFoundError):
        store.agents.get(AGENT)
    with pytest.raises(NotFoundError):
        store.agents.evict(AGENT)


@pytest.mark.parametrize(
    "change",
    [
        {"agent_id": "spiffe://other.org/spire/agent/x"},
        {"attestor": ""},
        {"serial": 5},
        {"selectors": ["nocolon"]},
        {"expires_at": float("nan")},
    ],
)
def test_invalid_agent_writes_nothing(store: Datastore, change: dict[str, object]) -> None:
    args: dict[str, object] = {
        "agent_id": AGENT,
        "attestor": "tpm",
        "selectors": [],
        "serial": "1",
        "expires_at": 1.0,
    }
    args.update(change)
    with pytest.raises(CustosError):
        store.agents.attested(**args)  # type: ignore[arg-type]
    assert store.agents.list() == []


def test_audit_records_in_order(store: Datastore) -> None:
    first = store.audit.record(
        who=AGENT,
        attestor="tpm",
        selectors=["unix:uid:1"],
        identity="spiffe://example.org/web",
        serial_or_jti="0a1b",
        not_after=2000.0,
        now=1000.0,
    )
    second = store.audit.record(
        who=AGENT,
        attestor="tpm",
        selectors=[],
        identity="spiffe://example.org/web",
        serial_or_jti="jti-2",
        not_after=2100.0,
    )
    assert store.audit.since() == [first, second]
    assert store.audit.since(first.seq) == [second]
    assert first.selectors == (Selector("unix", "uid:1"),)


def test_audit_refuses_bad_fields(store: Datastore) -> None:
    with pytest.raises(InvalidEntryError):
        store.audit.record(
            who="x" * 5000,
            attestor="tpm",
            selectors=[],
            identity="i",
            serial_or_jti="s",
            not_after=1.0,
        )
    assert store.audit.since() == []
