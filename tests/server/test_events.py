"""ChangeEvents: local bumps, another server's writes heard through PostgreSQL
LISTEN/NOTIFY, a dropped LISTEN connection that reconnects and heals, and the
safety poll that sees another process's writes on SQLite.

Waits are bounded (a test fails instead of hanging), never timed assertions.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import psycopg
import pytest

from custos.server.datastore import Datastore
from custos.server.datastore.signing_keys import SigningKeyRecord
from custos.server.events import LISTEN_APPLICATION_NAME, ChangeEvents

T = TypeVar("T")
TD = "example.org"
AGENT = f"spiffe://{TD}/custos/agent/join_token/a1"
#: Long enough that only a notification (not the safety poll) can wake a waiter.
NO_POLL = 3600.0
BOUND = 20.0


async def bounded(aw: Awaitable[T]) -> T:
    return await asyncio.wait_for(aw, BOUND)


def _record(kid: str) -> SigningKeyRecord:
    now = time.time()
    return SigningKeyRecord(
        kid=kid,
        purpose="jwt-svid",
        key_name=f"jwt-{kid}",
        alg="ES256",
        status="published",
        created_at=now,
        published_at=now,
    )


def test_local_bumps_wake_waiters_from_any_thread(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ds.db'}"
    with Datastore.open(url, trust_domain=TD) as ds:
        events = ChangeEvents(ds, url, poll_interval=NO_POLL)

        async def run() -> None:
            await events.start()
            try:
                seen = events.entries_generation
                waiter = asyncio.create_task(events.wait_entries(seen))
                await asyncio.sleep(0)
                assert not waiter.done()
                events.entries_changed()
                assert await bounded(waiter) > seen
                # a bump from another thread (an admin call run in to_thread)
                seen = events.bundle_generation
                waiter = asyncio.create_task(events.wait_bundle(seen))
                await asyncio.sleep(0)
                threading.Thread(target=events.bundle_changed).start()
                assert await bounded(waiter) > seen
                # a bump before the wait is not lost
                seen = events.entries_generation
                events.entries_changed()
                assert await bounded(events.wait_entries(seen)) == seen + 1
            finally:
                await events.stop()

        asyncio.run(run())


def _hears_writes_by(url: str, *, poll_interval: float) -> None:
    """A second Datastore object on ``url`` (another server or process) writes an
    entry, then a signing key; the first one's ChangeEvents hears both."""
    with Datastore.open(url, trust_domain=TD) as ds, Datastore.open(url, trust_domain=TD) as other:
        events = ChangeEvents(ds, url, poll_interval=poll_interval)

        async def run() -> None:
            await events.start()
            try:
                if ds.backend == "postgresql":
                    await bounded(events.wait_listening())
                seen = events.entries_generation
                await asyncio.to_thread(
                    other.entries.create, f"spiffe://{TD}/w", AGENT, ["unix:uid:1"]
                )
                assert await bounded(events.wait_entries(seen)) > seen
                seen = events.bundle_generation
                await asyncio.to_thread(
                    other.signing_keys.publish, "jwt-svid", lambda: _record("k1")
                )
                assert await bounded(events.wait_bundle(seen)) > seen
            finally:
                await events.stop()

        asyncio.run(run())


def test_sqlite_safety_poll_sees_another_process(tmp_path: Path) -> None:
    _hears_writes_by(f"sqlite:///{tmp_path / 'ds.db'}", poll_interval=0.05)


def test_postgres_write_by_another_server_is_heard(postgres_db: str) -> None:
    """Through NOTIFY: the safety poll is an hour away."""
    _hears_writes_by(postgres_db, poll_interval=NO_POLL)


def _terminate_listener(postgres_db: str) -> int:
    conninfo = postgres_db.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(conninfo, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (LISTEN_APPLICATION_NAME,),
        ).fetchall()
    return len(rows)


def test_postgres_dropped_listen_connection_reconnects(postgres_db: str) -> None:
    with (
        Datastore.open(postgres_db, trust_domain=TD) as ds,
        Datastore.open(postgres_db, trust_domain=TD) as other,
    ):
        events = ChangeEvents(ds, postgres_db, poll_interval=NO_POLL)

        async def run() -> None:
            await events.start()
            try:
                await bounded(events.wait_listening())
                assert events.listen_connects == 1
                seen = events.entries_generation
                assert await asyncio.to_thread(_terminate_listener, postgres_db) == 1
                # the reconnect itself bumps (a notification may have been missed)
                assert await bounded(events.wait_entries(seen)) > seen

                async def relistened() -> None:
                    while events.listen_connects < 2:
                        await asyncio.sleep(0.02)

                await bounded(relistened())
                await bounded(events.wait_listening())
                seen = events.entries_generation
                await asyncio.to_thread(
                    other.entries.create, f"spiffe://{TD}/w", AGENT, ["unix:uid:1"]
                )
                assert await bounded(events.wait_entries(seen)) > seen
            finally:
                await events.stop()

        asyncio.run(run())


def test_each_committed_write_notifies_its_sequence(postgres_db: str) -> None:
    """Each committed write notifies once, its change sequence as payload; a
    refused update (stale revision) sends nothing."""
    with (
        Datastore.open(postgres_db, trust_domain=TD) as ds,
        psycopg.connect(
            postgres_db.replace("postgresql+psycopg://", "postgresql://"), autocommit=True
        ) as listener,
    ):
        listener.execute("LISTEN custos_entries")
        entry = ds.entries.create(f"spiffe://{TD}/w", AGENT, ["unix:uid:1"])
        ds.entries.update(entry)
        with pytest.raises(Exception, match="revision"):
            ds.entries.update(entry)  # stale: rolled back
        deleted_seq = ds.entries.last_change_seq() + 1
        ds.entries.delete(entry.id)
        payloads = [n.payload for n in listener.notifies(timeout=BOUND, stop_after=3)]
        assert payloads == [str(entry.change_seq), str(entry.change_seq + 1), str(deleted_seq)]


def test_start_on_unreachable_postgres_does_not_fail(postgres_db: str) -> None:
    """The LISTEN task keeps retrying in the background; start() returns."""
    with Datastore.open(postgres_db, trust_domain=TD) as ds:
        # a port nobody listens on: the datastore itself is fine, LISTEN is not
        bad = "postgresql+psycopg://custos@127.0.0.1:9/nowhere"
        events = ChangeEvents(ds, bad, poll_interval=NO_POLL)

        async def run() -> None:
            await bounded(events.start())
            try:
                assert events.listen_connects == 0
            finally:
                await events.stop()

        asyncio.run(run())
