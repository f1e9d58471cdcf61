"""Migration 0006 (issue 10): agents' attestation keys, entries' require_residency,
audit rows' residency, and ``tpm_nodes`` (a TPM's clock never goes back, also when
two servers record at once). SQLite and PostgreSQL alike (``store`` / ``store_url``)."""

from __future__ import annotations

import contextvars
import random
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, text

import custos.server.datastore as datastore_package
from custos.server.datastore import Datastore, DatastoreError, InvalidEntryError
from custos.server.datastore.schema import metadata
from custos.server.datastore.tpm_nodes import MAX_CLOCK, MAX_COUNT, regression

from .conftest import AGENT, TRUST_DOMAIN

EK = "ab" * 32
OTHER_EK = "cd" * 32
AK = b"\x00\x58" + b"\x23" * 88  # shaped like an ECC TPM2B_PUBLIC; the store keeps bytes
WORKLOAD = "spiffe://example.org/w"


def _alembic(conn: object) -> Config:
    config = Config()
    config.set_main_option(
        "script_location", str(Path(datastore_package.__file__).parent / "migrations")
    )
    config.attributes["connection"] = conn
    return config


# -- the schema --------------------------------------------------------------------


def test_the_migrations_build_exactly_the_schema_module(store: Datastore, store_url: str) -> None:
    engine = create_engine(store_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
    finally:
        engine.dispose()
    # The partial unique indexes of signing_keys (migration 0002) are not declared in
    # schema.py (SQLAlchemy Core cannot compare their WHERE clause): left out here.
    partial = {"ux_signing_keys_one_active", "ux_signing_keys_one_published"}
    assert [d for d in diff if not (d[0] == "remove_index" and d[1].name in partial)] == []


def test_migration_0006_keeps_older_rows_and_gives_them_the_defaults(store_url: str) -> None:
    with Datastore.open(store_url, trust_domain=TRUST_DOMAIN) as ds:
        ds.entries.create(WORKLOAD, AGENT, ["unix:uid:1"], key_custody="tpm")
        ds.agents.attested(AGENT, attestor="join_token", selectors=[], serial="1", expires_at=9.0)
    engine = create_engine(store_url)
    with engine.begin() as conn:
        command.downgrade(_alembic(conn), "0005")
        conn.execute(
            text(
                "INSERT INTO audit (at, who, attestor, selectors, identity, serial_or_jti, "
                "not_after, event, custody, evidence) "
                "VALUES (1, 'w', 'a', '[]', 'i', 's', 2, 'x509-svid', 'tpm', '')"
            )
        )
    engine.dispose()
    with Datastore.open(store_url, trust_domain=TRUST_DOMAIN) as ds:
        [entry] = ds.entries.list()
        assert entry.require_residency is False
        assert entry.selectors[0].value == "uid:1"  # the downgrade's table copy kept them
        assert ds.agents.get(AGENT).attestation_key == b""
        [row] = ds.audit.since()
        assert (row.custody, row.residency) == ("tpm", "")
        assert ds.tpm_nodes.get(EK) is None


# -- entries -----------------------------------------------------------------------


def test_require_residency_is_refused_on_an_entry_whose_key_is_not_in_a_tpm(
    store: Datastore,
) -> None:
    for custody in ("memory", "pkcs11", "exportable"):
        with pytest.raises(InvalidEntryError) as err:
            store.entries.create(
                WORKLOAD, AGENT, ["unix:uid:1"], key_custody=custody, require_residency=True
            )
        assert err.value.code == "residency_needs_tpm_custody"
    assert store.entries.count() == 0
    entry = store.entries.create(
        WORKLOAD, AGENT, ["unix:uid:1"], key_custody="tpm", require_residency=True
    )
    with pytest.raises(InvalidEntryError) as err:
        store.entries.update(replace(entry, key_custody="memory"))
    assert err.value.code == "residency_needs_tpm_custody"
    with pytest.raises(InvalidEntryError) as err:
        store.entries.update(replace(entry, require_residency="yes"))  # type: ignore[arg-type]
    assert err.value.code == "invalid_flag"
    assert store.entries.get(entry.id) == entry


def test_require_residency_is_stored_and_updated(store: Datastore) -> None:
    entry = store.entries.create(WORKLOAD, AGENT, ["unix:uid:1"], key_custody="tpm")
    assert entry.require_residency is False
    required = store.entries.update(replace(entry, require_residency=True))
    assert store.entries.get(entry.id).require_residency is True
    assert store.entries.list(parent_id=AGENT) == [required]
    relaxed = store.entries.update(replace(required, require_residency=False, key_custody="memory"))
    assert store.entries.get(entry.id) == relaxed and not relaxed.require_residency


# -- agents --------------------------------------------------------------------------


def test_an_agent_keeps_the_attestation_key_of_its_latest_attestation(store: Datastore) -> None:
    agent = store.agents.attested(
        AGENT, attestor="tpm", selectors=[], serial="1", expires_at=9.0, attestation_key=AK
    )
    assert agent.attestation_key == AK == store.agents.get(AGENT).attestation_key
    store.agents.renewed(AGENT, serial="2", expires_at=10.0)  # a renewal keeps it
    assert store.agents.get(AGENT).attestation_key == AK
    new_ak = AK[:-1] + b"\x24"
    store.agents.attested(
        AGENT, attestor="tpm", selectors=[], serial="3", expires_at=11.0, attestation_key=new_ak
    )
    assert store.agents.get(AGENT).attestation_key == new_ak
    store.agents.attested(AGENT, attestor="tpm", selectors=[], serial="4", expires_at=12.0)
    assert store.agents.get(AGENT).attestation_key == b""  # attested without one: none
    assert store.agents.list()[0].attestation_key == b""


@pytest.mark.parametrize("key", ["text", b"x" * 2049, None])
def test_a_malformed_attestation_key_is_refused(store: Datastore, key: object) -> None:
    with pytest.raises(InvalidEntryError) as err:
        store.agents.attested(
            AGENT, attestor="tpm", selectors=[], serial="1", expires_at=9.0,
            attestation_key=key,  # type: ignore[arg-type]
        )  # fmt: skip
    assert err.value.code == "invalid_attestation_key"
    assert store.agents.list() == []


# -- audit ---------------------------------------------------------------------------


def test_audit_rows_record_residency(store: Datastore) -> None:
    common = dict(who="w", attestor="tpm", selectors=[], identity="i", not_after=1.0)
    with pytest.raises(InvalidEntryError) as err:
        store.audit.record(serial_or_jti="0", residency="maybe", **common)  # type: ignore[arg-type]
    assert err.value.code == "invalid_audit_record"
    assert store.audit.since() == []
    for n, residency in enumerate(("proven", "unproven", "")):
        store.audit.record(serial_or_jti=str(n), custody="tpm", residency=residency, **common)  # type: ignore[arg-type]
    assert [r.residency for r in store.audit.since()] == ["proven", "unproven", ""]


# -- tpm_nodes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ((100, 3, 0), (100, 2, 0)),  # resetCount back
        ((100, 3, 5), (900, 2, 9)),  # resetCount back, even with the rest ahead
        ((100, 3, 5), (900, 3, 4)),  # restartCount back under the same resetCount
        ((100, 3, 5), (99, 3, 5)),  # clock back, no reset or restart
    ],
)
def test_a_regression_is_refused_and_nothing_is_written(
    store: Datastore, before: tuple[int, int, int], after: tuple[int, int, int]
) -> None:
    stored = store.tpm_nodes.record(EK, AK, *before, now=50.0)
    with pytest.raises(DatastoreError) as err:
        store.tpm_nodes.record(EK, AK, *after)  # the same AK: comparable counters
    assert err.value.code == "tpm_clock_regressed"
    assert store.tpm_nodes.get(EK) == stored
    assert regression(before, after) is not None
    # Quoted by another AK (activated anew): the TPM obfuscates its counts differently,
    # so they start a new baseline instead of comparing ...
    new_ak = AK[:-1] + b"\x00"
    rebased = store.tpm_nodes.record(EK, new_ak, *after)
    assert store.tpm_nodes.get(EK) == rebased and rebased.ak_public == new_ak
    # ... and that AK's own history is held from then on.
    with pytest.raises(DatastoreError):
        store.tpm_nodes.record(EK, new_ak, after[0] - 1, after[1], after[2])


def test_a_deferred_clock_write_is_checked_now_and_written_only_in_the_unit(
    store: Datastore,
) -> None:
    """Decision 0108: inside ``deferring_writes`` (node attestation) a clock row is
    checked at once — a regression refused then — and written only when the owner runs
    the writes in its unit of work, checked again there; never run, never written."""
    first = store.tpm_nodes.record(EK, AK, 100, 3, 5)
    with store.deferring_writes() as writes:
        with pytest.raises(DatastoreError) as err:
            store.tpm_nodes.record(EK, AK, 99, 3, 5)
        assert err.value.code == "tpm_clock_regressed"
        # In a worker thread too (asyncio.to_thread copies the context): collected.
        done = threading.Event()
        ctx = contextvars.copy_context()
        threading.Thread(
            target=lambda: (ctx.run(store.tpm_nodes.record, EK, AK, 200, 3, 5), done.set())
        ).start()
        assert done.wait(30)
    assert store.tpm_nodes.get(EK) == first  # nothing written yet
    # Another server records a later quote meanwhile: the deferred write is refused
    # when it runs, and the unit (here with an audit row) is rolled back whole.
    store.tpm_nodes.record(EK, AK, 300, 3, 5)
    with pytest.raises(DatastoreError) as err, store.unit_of_work():
        store.audit.record(
            who="w", attestor="tpm", selectors=(), identity="i", serial_or_jti="s", not_after=2e9
        )
        writes.run()
    assert err.value.code == "tpm_clock_regressed"
    assert store.audit.since() == [] and store.tpm_nodes.get(EK).clock == 300  # type: ignore[union-attr]
    # Without that, the write runs in the unit and commits with it.
    with store.deferring_writes() as later:
        store.tpm_nodes.record(EK, AK, 400, 3, 5)
        store.tpm_nodes.record(OTHER_EK, AK, 1, 1, 1)  # a TPM never seen: inserted
    with store.unit_of_work():
        later.run()
    assert store.tpm_nodes.get(EK).clock == 400  # type: ignore[union-attr]
    assert store.tpm_nodes.get(OTHER_EK).clock == 1  # type: ignore[union-attr]


def test_a_deferred_write_of_a_new_tpm_meets_the_row_another_server_wrote_meanwhile(
    store_url: str,
) -> None:
    """A TPM never seen when its quote was checked, recorded by another server before
    the unit of work runs: the deferred write is checked against that row and updates
    it, and the rest of the unit commits."""
    with (
        Datastore.open(store_url, trust_domain=TRUST_DOMAIN) as one,
        Datastore.open(store_url, trust_domain=TRUST_DOMAIN) as two,
    ):
        with two.deferring_writes() as writes:
            two.tpm_nodes.record(EK, AK, 50, 3, 5)  # checked: no row yet
        one.tpm_nodes.record(EK, AK, 10, 3, 5)  # the other server wins the insert
        with two.unit_of_work():
            writes.run()
            two.audit.record(
                who="w", attestor="tpm", selectors=(), identity="i", serial_or_jti="s",
                not_after=2e9,
            )  # fmt: skip
        assert one.tpm_nodes.get(EK).clock == 50  # type: ignore[union-attr]
        assert len(one.audit.since()) == 1


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ((100, 3, 5), (100, 3, 5)),  # the same (nothing went back)
        ((100, 3, 5), (101, 3, 5)),
        ((100, 3, 5), (7, 4, 0)),  # TPM reset: clock and restartCount may start over
        ((100, 3, 5), (7, 3, 6)),  # TPM restart: the clock may be behind
    ],
)
def test_progress_is_recorded(
    store: Datastore, before: tuple[int, int, int], after: tuple[int, int, int]
) -> None:
    assert store.tpm_nodes.get(EK) is None
    store.tpm_nodes.record(EK, AK, *before)
    new_ak = AK[:-1] + b"\x00"
    node = store.tpm_nodes.record(EK, new_ak, *after, now=60.0)
    assert store.tpm_nodes.get(EK) == node
    assert (node.ak_public, node.clock, node.reset_count, node.restart_count) == (new_ak, *after)
    assert node.updated_at == 60.0
    assert store.tpm_nodes.get(OTHER_EK) is None  # one row per TPM


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("AB" * 32, AK, 1, 1, 1), "invalid_ek_hash"),
        (("ab" * 31, AK, 1, 1, 1), "invalid_ek_hash"),
        ((EK, b"", 1, 1, 1), "invalid_attestation_key"),
        ((EK, "ak", 1, 1, 1), "invalid_attestation_key"),
        ((EK, b"x" * 2049, 1, 1, 1), "invalid_attestation_key"),
        ((EK, AK, -1, 1, 1), "invalid_tpm_clock"),
        ((EK, AK, MAX_CLOCK + 1, 1, 1), "invalid_tpm_clock"),
        ((EK, AK, 1, MAX_COUNT + 1, 1), "invalid_tpm_clock"),
        ((EK, AK, 1, 1, True), "invalid_tpm_clock"),
        ((EK, AK, 1.5, 1, 1), "invalid_tpm_clock"),
    ],
)
def test_malformed_tpm_node_values_are_refused(
    store: Datastore, args: tuple[object, ...], code: str
) -> None:
    with pytest.raises(InvalidEntryError) as err:
        store.tpm_nodes.record(*args)  # type: ignore[arg-type]
    assert err.value.code == code
    assert store.tpm_nodes.get(EK) is None


def test_the_largest_values_fit(store: Datastore) -> None:
    node = store.tpm_nodes.record(EK, AK, MAX_CLOCK, MAX_COUNT, MAX_COUNT)
    assert store.tpm_nodes.get(EK) == node


def _race(servers: list[Datastore], ek: str, clocks: list[int]) -> dict[int, str]:
    """Each server records one clock, all released at once: clock -> outcome."""
    barrier = threading.Barrier(len(servers))
    outcomes: dict[int, str] = {}

    def record(server: Datastore, clock: int) -> None:
        barrier.wait()
        try:
            server.tpm_nodes.record(ek, AK, clock, 5, 0)
            outcomes[clock] = "recorded"
        except DatastoreError as e:
            outcomes[clock] = e.code

    threads = [
        threading.Thread(target=record, args=(s, c)) for s, c in zip(servers, clocks, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return outcomes


@pytest.mark.parametrize("existing", [False, True], ids=["new-tpm", "known-tpm"])
def test_servers_racing_never_store_a_regression(store_url: str, existing: bool) -> None:
    """Four servers (each its own Datastore, its own connections) record quotes of one
    TPM at once, each with another clock: whatever the order, the clock stored at the
    end is the highest (it is never refused, and nothing lower overwrites it), every
    refusal is tpm_clock_regressed, and a recorded value was never below one stored
    before it."""
    servers = [Datastore.open(store_url, trust_domain=TRUST_DOMAIN) for _ in range(4)]
    rng = random.Random(10)
    try:
        for round_ in range(6):
            ek = f"{round_:064x}"
            if existing:
                servers[0].tpm_nodes.record(ek, AK, 1, 5, 0)
            clocks = rng.sample(range(2, 10_000), len(servers))
            outcomes = _race(servers, ek, clocks)
            assert set(outcomes.values()) <= {"recorded", "tpm_clock_regressed"}, outcomes
            assert outcomes[max(clocks)] == "recorded"
            node = servers[1].tpm_nodes.get(ek)
            assert node is not None and node.clock == max(clocks)
            # A refused clock was below one recorded before it: some higher clock won.
            for clock, outcome in outcomes.items():
                if outcome != "recorded":
                    assert any(c > clock and o == "recorded" for c, o in outcomes.items())
    finally:
        for server in servers:
            server.close()
