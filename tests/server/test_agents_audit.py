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


def test_renewed_updates_serial_and_expiry_only(store: Datastore) -> None:
    store.agents.attested(
        AGENT, attestor="join_token", selectors=["a:b"], serial="1", expires_at=1.0, now=100.0
    )
    renewed = store.agents.renewed(AGENT, serial="2", expires_at=9.0, now=200.0)
    assert store.agents.get(AGENT) == renewed
    assert (renewed.serial, renewed.expires_at, renewed.updated_at) == ("2", 9.0, 200.0)
    assert renewed.attestor == "join_token" and [str(s) for s in renewed.selectors] == ["a:b"]
    assert not renewed.evicted and not renewed.banned


def test_an_eviction_between_the_read_and_the_renewal_write_is_not_undone(
    store: Datastore,
) -> None:
    # RenewAgent: the agent authenticated (read: attested), then an operator evicts it
    # while its credentials are being issued; the renewal's write must be refused.
    store.agents.attested(AGENT, attestor="join_token", selectors=[], serial="1", expires_at=1.0)
    assert not store.agents.get(AGENT).evicted  # what the renewal read
    store.agents.evict(AGENT)
    with pytest.raises(DatastoreError) as err:
        store.agents.renewed(AGENT, serial="2", expires_at=9.0)
    assert err.value.code == "agent_evicted"
    after = store.agents.get(AGENT)
    assert after.evicted and after.serial == "1" and after.expires_at == 1.0


def test_renewed_refuses_banned_and_unknown_agents(store: Datastore) -> None:
    with pytest.raises(DatastoreError) as err:
        store.agents.renewed(AGENT, serial="2", expires_at=9.0)
    assert err.value.code == "agent_evicted"  # never attested (or gone): attest first
    assert store.agents.list() == []
    store.agents.attested(AGENT, attestor="join_token", selectors=[], serial="1", expires_at=1.0)
    store.agents.ban(AGENT)
    with pytest.raises(DatastoreError) as err:
        store.agents.renewed(AGENT, serial="2", expires_at=9.0)
    assert err.value.code == "agent_banned"
    after = store.agents.get(AGENT)
    assert after.banned and after.evicted and after.serial == "1"


@pytest.mark.parametrize(
    "change", [{"serial": ""}, {"serial": 5}, {"expires_at": float("inf")}, {"now": float("nan")}]
)
def test_renewed_refuses_bad_fields(store: Datastore, change: dict[str, object]) -> None:
    store.agents.attested(AGENT, attestor="tpm", selectors=[], serial="1", expires_at=1.0)
    args: dict[str, object] = {"serial": "2", "expires_at": 9.0}
    args.update(change)
    with pytest.raises(CustosError):
        store.agents.renewed(AGENT, **args)  # type: ignore[arg-type]
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


def test_a_batch_of_audit_rows_gets_its_keys_in_its_order(store: Datastore) -> None:
    """One multi-row INSERT whose RETURNING order is not promised: each returned key is
    matched to its row, rows alike in every column included (they get keys in order)."""
    items = [
        dict(
            who=AGENT,
            attestor="tpm",
            selectors=("unix:uid:1",),
            identity=f"spiffe://example.org/w{i % 7}",
            serial_or_jti=f"{(i * 37) % 11:x}",
            not_after=2000.0 + i % 3,
            custody=("memory", "tpm")[i % 2],
            residency=("", "proven")[i % 2],
        )
        for i in range(50)
    ]
    items = items * 3  # rows alike in every column, in one batch
    records = store.audit.record_many(items)
    assert [r.seq for r in records] == sorted(r.seq for r in records)
    assert len({r.seq for r in records}) == len(items)
    assert store.audit.since(limit=1000) == records
    for item, record in zip(items, records, strict=True):
        assert (record.identity, record.serial_or_jti, record.not_after, record.custody) == (
            item["identity"],
            item["serial_or_jti"],
            item["not_after"],
            item["custody"],
        )


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
