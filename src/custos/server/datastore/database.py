"""Opening a database: URL check, engine, migrations at open, and the one place
driver errors become :class:`DatastoreUnavailableError`."""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.util import CommandError
from sqlalchemy import Connection, CursorResult, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DatabaseError,
    DBAPIError,
    InterfaceError,
    OperationalError,
)

from custos._extras import extra_needed
from custos.server.datastore.errors import (
    DatastoreError,
    DatastoreUnavailableError,
    UnsupportedDatastoreURLError,
)

_MIGRATIONS = Path(__file__).parent / "migrations"
#: Any fixed number: the advisory lock that keeps two servers opening one fresh
#: PostgreSQL database from running the migrations at once.
_MIGRATION_LOCK = 0x637573746F73  # "custos"
#: How long a PostgreSQL connection attempt waits before the datastore is "unavailable".
CONNECT_TIMEOUT = 5
#: The execution option that marks a read-only transaction.
_READ_ONLY = "custos_read_only"
#: How long a SQLite writer waits for another writer's lock.
SQLITE_BUSY_SECONDS = 30.0


def parse_url(url: str) -> URL:
    """``sqlite:///<path>`` or ``postgresql[+psycopg]://...`` (psycopg 3), else one error."""
    if not isinstance(url, str):
        raise UnsupportedDatastoreURLError(
            f"datastore URL must be a string, not {type(url).__name__}"
        )
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UnsupportedDatastoreURLError(
            "datastore URL is malformed; use sqlite:///<path> or postgresql://user@host/db"
        ) from None
    if parsed.drivername in ("postgresql", "postgresql+psycopg"):
        return parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername == "sqlite":
        if parsed.database in (None, "", ":memory:") or parsed.host:
            # Each pooled connection would get its own empty in-memory database.
            raise UnsupportedDatastoreURLError("a SQLite datastore needs a file: sqlite:///<path>")
        return parsed
    raise UnsupportedDatastoreURLError(
        f"unsupported datastore scheme {parsed.drivername!r}; use sqlite:/// or postgresql://"
    )


def make_engine(url: URL) -> Engine:
    if url.get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_SECONDS})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: sqlite3.Connection, _record: object) -> None:
            # Python's sqlite3 opens transactions only before INSERT/UPDATE/DELETE,
            # so reads and DDL (the migrations) ran outside any; we say BEGIN ourselves.
            dbapi_conn.isolation_level = None
            dbapi_conn.execute("PRAGMA foreign_keys=ON")  # ON DELETE CASCADE of selectors
            try:
                dbapi_conn.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
            except sqlite3.OperationalError:
                pass  # another connection is switching the file to WAL right now

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            # IMMEDIATE takes the write lock at BEGIN: a transaction that reads
            # then writes (a check, then the change) cannot be overtaken between
            # the two; read-only transactions stay DEFERRED and never wait.
            conn.exec_driver_sql(
                "BEGIN DEFERRED"
                if conn.get_execution_options().get(_READ_ONLY)
                else "BEGIN IMMEDIATE"
            )

        return engine
    # pre_ping: a connection left from before a database restart is replaced, not used.
    with extra_needed("server"):  # SQLAlchemy imports psycopg here, not at our import
        return create_engine(
            url, pool_pre_ping=True, connect_args={"connect_timeout": CONNECT_TIMEOUT}
        )


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration (a no-op when it is there)."""
    # Alembic logs each revision's (multi-line) description and its dialect at INFO:
    # noise that breaks the server's one-line-per-record log. Its warnings still show.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    with transaction(engine) as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
        config.attributes["connection"] = conn
        try:
            command.upgrade(config, "head")
        except CommandError as exc:
            # A revision this custos does not ship: a newer custos migrated the
            # database. Running on a schema we do not know would corrupt it.
            raise DatastoreError(
                f"the database's schema is not one this custos knows ({exc}); "
                "was it migrated by a newer custos?",
                code="datastore_schema_unknown",
            ) from None


@dataclass
class _Unit:
    """An open unit of work: its engine, connection, thread, and what runs once it commits."""

    engine: Engine
    conn: Connection
    thread: int
    after_commit: list[Callable[[], None]] = field(default_factory=list)


#: The unit of work open in this thread (or task), if any.
_unit: ContextVar[_Unit | None] = ContextVar("custos_datastore_unit", default=None)


def _joined(engine: Engine) -> _Unit | None:
    """The unit of work this call joins: one open on ``engine`` in this very thread
    (``asyncio.to_thread`` copies the context into another thread: not joined there)."""
    unit = _unit.get()
    if unit is None or unit.engine is not engine or unit.thread != threading.get_ident():
        return None
    return unit


@contextmanager
def unit_of_work(engine: Engine) -> Iterator[None]:
    """One transaction for every datastore write made inside it, in this thread
    (decision 0105): each repository call's :func:`transaction` joins it instead of
    committing on its own, so the writes of one issuance or attestation are one
    commit (one fsync) — all of them, or none when anything inside raises.

    Work registered with :func:`after_commit` (the audit log's lines) runs once the
    unit has committed, never when it rolled back. A unit opened inside a unit of
    the same engine joins it.
    """
    if _joined(engine) is not None:
        yield
        return
    with transaction(engine) as conn:
        unit = _Unit(engine, conn, threading.get_ident())
        token = _unit.set(unit)
        try:
            yield
        finally:
            _unit.reset(token)
    for work in unit.after_commit:
        work()


@dataclass
class DeferredWrites:
    """Writes asked for inside :func:`deferring_writes`, to be run by its owner inside
    the unit of work it opens later (node attestation: the TPM clock row its attestor
    writes, run with the issuance's writes). Never run: never written."""

    engine: Engine
    writes: list[Callable[[], object]] = field(default_factory=list)

    def run(self) -> None:
        """Run the writes, in the order they were asked for (inside a unit of work)."""
        for write in self.writes:
            write()


_deferred: ContextVar[DeferredWrites | None] = ContextVar("custos_deferred_writes", default=None)


@contextmanager
def deferring_writes(engine: Engine) -> Iterator[DeferredWrites]:
    """Code run inside it — in this task and in the worker threads it starts
    (``asyncio.to_thread`` copies the context) — has the writes that support it
    (:func:`defer_write`) collected instead of made. The owner runs them later in its
    unit of work with :meth:`DeferredWrites.run` (decision 0108)."""
    deferred = DeferredWrites(engine)
    token = _deferred.set(deferred)
    try:
        yield deferred
    finally:
        _deferred.reset(token)


def is_deferring(engine: Engine) -> bool:
    """Whether a :func:`deferring_writes` on ``engine`` is open here (a check that may
    refuse early can then run before its write is collected)."""
    deferred = _deferred.get()
    return deferred is not None and deferred.engine is engine


def defer_write(engine: Engine, write: Callable[[], object]) -> bool:
    """Collect ``write`` when a :func:`deferring_writes` on ``engine`` is open here
    (True), else do nothing (False: the caller writes now)."""
    deferred = _deferred.get()
    if deferred is None or deferred.engine is not engine:
        return False
    deferred.writes.append(write)
    return True


def after_commit(engine: Engine, work: Callable[[], None]) -> None:
    """Run ``work`` when the unit of work this thread has open on ``engine`` commits;
    at once when there is none (the caller's own transaction has committed)."""
    unit = _joined(engine)
    if unit is None:
        work()
    else:
        unit.after_commit.append(work)


@contextmanager
def transaction(engine: Engine, *, read_only: bool = False) -> Iterator[Connection]:
    """One transaction; a lost or refused connection becomes DatastoreUnavailableError.

    ``read_only`` lets SQLite readers run beside a writer (see make_engine). Inside a
    :func:`unit_of_work` on ``engine`` (same thread) this is the unit's connection
    and transaction: nothing commits here, and what raises rolls the whole unit back.
    """
    unit = _joined(engine)
    if unit is not None:
        yield unit.conn
        return
    try:
        with engine.connect() as conn:
            conn.execution_options(**{_READ_ONLY: read_only})
            with conn.begin():
                yield conn
    except (OperationalError, InterfaceError) as exc:
        raise DatastoreUnavailableError(_reason(exc)) from None
    except DBAPIError as exc:
        # A plain DatabaseError is SQLite's "file is not a database": the datastore
        # cannot be used, as when it is unreachable; its subclasses (integrity,
        # programming errors) are about one statement and pass through.
        if exc.connection_invalidated or type(exc) is DatabaseError:
            raise DatastoreUnavailableError(_reason(exc)) from None
        raise


def _reason(exc: DBAPIError) -> str:
    first = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else ""
    return f"the datastore is unavailable: {first[:300]}"


def inserted_key(result: CursorResult[Any]) -> int:
    """The autoincremented primary key an INSERT just generated."""
    key = result.inserted_primary_key
    if key is None:  # only for an INSERT without a generated key: a bug here
        raise DatastoreError("the insert generated no key", code="datastore_bug")
    return int(key[0])
