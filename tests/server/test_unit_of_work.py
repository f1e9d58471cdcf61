"""The datastore's unit of work (decision 0105): repository writes made inside
``Datastore.unit_of_work()`` in one thread are one transaction, on SQLite and
PostgreSQL — committed together, rolled back together, their after-commit work
(the audit log's lines) run only once they are committed."""

from __future__ import annotations

import threading
import time

import pytest

from custos.server.datastore import Datastore, NotFoundError
from custos.server.datastore.signing_keys import SigningKeyRecord

ROW = dict(
    event="x509-svid",
    who="spiffe://example.org/custos/agent/test/n1",
    attestor="test",
    selectors=("node:n1",),
    identity="spiffe://example.org/w",
    serial_or_jti="0a",
    not_after=2e9,
)


def _key(store: Datastore) -> SigningKeyRecord:
    record = SigningKeyRecord(
        kid="k1",
        purpose="x509-ca",
        key_name="k1",
        alg="ES256",
        status="published",
        created_at=1.0,
        published_at=1.0,
    )
    store.signing_keys.publish("x509-ca", lambda: record)
    return record


def _in_another_thread(work: object) -> object:
    out: list[object] = []
    thread = threading.Thread(target=lambda: out.append(work()))  # type: ignore[operator]
    thread.start()
    thread.join(30)
    return out[0]


def test_writes_in_a_unit_commit_together_then_its_after_commit_work_runs(
    store: Datastore,
) -> None:
    key = _key(store)
    seen: list[object] = []
    with store.unit_of_work():
        [row] = store.audit.record_many([ROW])
        store.signing_keys.note_issued(key.kid, 2e9)
        store.after_commit(lambda: seen.append(_in_another_thread(store.audit.since)))
        # Another thread is not in this unit: it sees nothing of it before the commit.
        assert _in_another_thread(store.audit.since) == []
        assert seen == []
    # The work ran after the commit: another connection saw the row then.
    assert seen == [[row]]
    assert store.signing_keys.get(key.kid).last_not_after == 2e9


def test_a_failure_inside_a_unit_rolls_back_every_write_and_skips_its_after_commit_work(
    store: Datastore,
) -> None:
    key = _key(store)
    seen: list[str] = []
    with pytest.raises(NotFoundError), store.unit_of_work():
        store.audit.record_many([ROW])
        store.after_commit(lambda: seen.append("ran"))
        store.signing_keys.note_issued(key.kid, 2e9)
        store.signing_keys.note_issued("no-such-kid", 2e9)
    assert store.audit.since() == [] and seen == []
    assert store.signing_keys.get(key.kid).last_not_after is None


def test_a_unit_inside_a_unit_joins_it(store: Datastore) -> None:
    with pytest.raises(RuntimeError), store.unit_of_work():
        with store.unit_of_work():
            store.audit.record_many([ROW])
        assert len(store.audit.since()) == 1  # this transaction sees its own row
        raise RuntimeError("the outer unit fails")
    assert store.audit.since() == []


def test_outside_a_unit_each_call_commits_and_after_commit_work_runs_at_once(
    store: Datastore,
) -> None:
    seen: list[float] = []
    store.audit.record_many([ROW])
    store.after_commit(lambda: seen.append(time.time()))
    assert seen and len(_in_another_thread(store.audit.since)) == 1  # type: ignore[arg-type]
