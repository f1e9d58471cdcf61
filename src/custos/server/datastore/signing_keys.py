"""Signing-key metadata: the state of each CA / JWT-SVID / WIT key, never its material.

Every change of state runs under one per-purpose lock (SQLite: BEGIN IMMEDIATE;
PostgreSQL: a transaction-scoped advisory lock), so servers sharing a
datastore that publish or activate at once end with one published and one
active key, not two; partial unique indexes enforce the same in the schema.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Row,
    Select,
    delete,
    insert,
    or_,
    select,
    text,
    update,
)

from custos.server.datastore.database import transaction
from custos.server.datastore.errors import NotFoundError
from custos.server.datastore.schema import signing_keys

#: The purposes a server signs for, and the advisory-lock number of each.
PURPOSES = {"x509-ca": 1, "jwt-svid": 2, "wit": 3}
#: First advisory-lock key ("signkeys"), distinct from the migration lock.
_LOCK_SPACE = 0x7369676E


@dataclass(frozen=True)
class SigningKeyRecord:
    """What the datastore knows of one signing key (all of it public)."""

    kid: str
    purpose: str
    key_name: str
    alg: str
    status: str  # published | active | retired
    created_at: float
    published_at: float
    active_from: float | None = None
    retired_at: float | None = None
    last_not_after: float | None = None
    certificate: str | None = None  # PEM root certificate of an x509-ca key


class SigningKeyRepository:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @contextmanager
    def _locked(self, purpose: str) -> Iterator[Connection]:
        with transaction(self._engine) as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(
                    text("SELECT pg_advisory_xact_lock(:a, :b)"),
                    {"a": _LOCK_SPACE, "b": PURPOSES[purpose]},
                )
            yield conn

    def publish(
        self, purpose: str, make: Callable[[], SigningKeyRecord]
    ) -> tuple[SigningKeyRecord, bool]:
        """The purpose's published key; when there is none, ``make()`` one and store it.

        Returns the record and whether ``make`` ran.  ``make`` runs under the lock,
        so of servers preparing at once exactly one creates a key.
        """
        with self._locked(purpose) as conn:
            row = conn.execute(_of(purpose, "published")).first()
            if row is not None:
                return _record(row), False
            record = make()
            conn.execute(insert(signing_keys).values(**record.__dict__))
            _bundle_changed(conn, purpose)
            return record, True

    def activate(
        self, purpose: str, *, published_before: float, now: float
    ) -> SigningKeyRecord | None:
        """Make the published key active if it was published at or before
        ``published_before``; the active key becomes retired.  None when no key is due."""
        with self._locked(purpose) as conn:
            row = conn.execute(_of(purpose, "published")).first()
            if row is None or row.published_at > published_before:
                return None
            _bundle_changed(conn, purpose)
            return _switch(conn, purpose, row.kid, now)

    def activate_now(
        self, purpose: str, make: Callable[[], SigningKeyRecord], *, now: float, first: bool
    ) -> tuple[SigningKeyRecord, bool]:
        """Activate the published key, or one ``make()`` makes, at once.

        With ``first`` only when the purpose has no active key (the first start),
        else the active key is returned: of servers starting at once on a fresh
        datastore, one makes the first key.  Returns the active record and
        whether ``make`` ran.
        """
        with self._locked(purpose) as conn:
            if first:
                row = conn.execute(_of(purpose, "active")).first()
                if row is not None:
                    return _record(row), False
            _bundle_changed(conn, purpose)
            row = conn.execute(_of(purpose, "published")).first()
            if row is not None:
                return _switch(conn, purpose, row.kid, now), False
            record = make()
            conn.execute(insert(signing_keys).values(**record.__dict__))
            return _switch(conn, purpose, record.kid, now), True

    def of_purpose(self, purpose: str) -> list[SigningKeyRecord]:
        """Every key of the purpose still known, oldest first."""
        with transaction(self._engine, read_only=True) as conn:
            rows = conn.execute(
                select(signing_keys)
                .where(signing_keys.c.purpose == purpose)
                .order_by(signing_keys.c.created_at, signing_keys.c.kid)
            ).all()
        return [_record(r) for r in rows]

    def get(self, kid: str) -> SigningKeyRecord:
        with transaction(self._engine, read_only=True) as conn:
            row = conn.execute(select(signing_keys).where(signing_keys.c.kid == kid)).first()
        if row is None:
            raise NotFoundError(f"no signing key {kid[:64]!r}", code="signing_key_unknown")
        return _record(row)

    def note_issued(self, kid: str, not_after: float) -> None:
        """Raise the key's ``last_not_after`` to ``not_after`` (never lowers it)."""
        with transaction(self._engine) as conn:
            changed = conn.execute(
                update(signing_keys)
                .where(
                    signing_keys.c.kid == kid,
                    or_(
                        signing_keys.c.last_not_after.is_(None),
                        signing_keys.c.last_not_after < not_after,
                    ),
                )
                .values(last_not_after=not_after)
            ).rowcount
            if (
                changed == 0
                and conn.execute(
                    select(signing_keys.c.kid).where(signing_keys.c.kid == kid)
                ).first()
                is None
            ):
                raise NotFoundError(f"no signing key {kid[:64]!r}", code="signing_key_unknown")

    def remove_expired(
        self, purpose: str, *, retired_before: float, now: float
    ) -> list[SigningKeyRecord]:
        """Delete retired keys retired at or before ``retired_before`` whose
        credentials have all expired (``now > last_not_after``); returns them."""
        with self._locked(purpose) as conn:
            rows = conn.execute(
                select(signing_keys).where(
                    signing_keys.c.purpose == purpose,
                    signing_keys.c.status == "retired",
                    signing_keys.c.retired_at <= retired_before,
                    or_(
                        signing_keys.c.last_not_after.is_(None),
                        signing_keys.c.last_not_after < now,
                    ),
                )
            ).all()
            if rows:
                conn.execute(
                    delete(signing_keys).where(signing_keys.c.kid.in_([r.kid for r in rows]))
                )
                _bundle_changed(conn, purpose)
        return [_record(r) for r in rows]


def _bundle_changed(conn: Connection, purpose: str) -> None:
    """Tell every server (custos.server.events LISTENs on ``custos_bundle``) that
    the keys in the bundle changed; PostgreSQL delivers it only if this commits."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_notify('custos_bundle', :p)"), {"p": purpose})


def _switch(conn: Connection, purpose: str, kid: str, now: float) -> SigningKeyRecord:
    """Retire the purpose's active key and make ``kid`` active (under the lock)."""
    conn.execute(
        update(signing_keys)
        .where(signing_keys.c.purpose == purpose, signing_keys.c.status == "active")
        .values(status="retired", retired_at=now)
    )
    conn.execute(
        update(signing_keys)
        .where(signing_keys.c.kid == kid)
        .values(status="active", active_from=now)
    )
    return _record(conn.execute(select(signing_keys).where(signing_keys.c.kid == kid)).one())


def _of(purpose: str, status: str) -> Select[Any]:
    return select(signing_keys).where(
        signing_keys.c.purpose == purpose, signing_keys.c.status == status
    )


def _record(row: Row[object]) -> SigningKeyRecord:
    return SigningKeyRecord(
        kid=row.kid,
        purpose=row.purpose,
        key_name=row.key_name,
        alg=row.alg,
        status=row.status,
        created_at=row.created_at,
        published_at=row.published_at,
        active_from=row.active_from,
        retired_at=row.retired_at,
        last_not_after=row.last_not_after,
        certificate=row.certificate,
    )
