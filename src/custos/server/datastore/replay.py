"""A replay cache in the datastore, shared by every server that uses it
(the :class:`custos.wimse.replay.ReplayCache` Protocol).

Each proof is one row keyed by SHA-256(namespace NUL value); the primary key
makes the insert the check: of two servers storing one proof, the second's
insert fails and it sees a replay. The proof's own row, if expired, is deleted
in the same transaction before the insert, so an expired proof id may be used
again; every other expired row is pruned at most once a minute per cache
(a delete of all expired rows on every check made concurrent servers queue on
each other's row locks).

Inside :meth:`Datastore.deferring_writes` (an X.509-SVID batch: authentication and
issuance in one worker call, decision 0128) the check is a read now and the insert
joins the call's unit of work, so the proof's row commits with the audit rows it
authorised: one commit per batch, not two. Two calls racing with one proof both pass
the read; the second's insert then fails on the primary key and its whole unit rolls
back (:class:`custos.wimse.errors.ReplayError`): its certificates never leave.
"""

from __future__ import annotations

import time

from sqlalchemy import Engine, and_, delete, insert, select
from sqlalchemy.exc import IntegrityError

from custos.server.datastore.database import defer_write, is_deferring, transaction
from custos.server.datastore.errors import DatastoreUnavailableError
from custos.server.datastore.schema import replay
from custos.wimse.errors import ReplayError
from custos.wimse.replay import ReplayCacheUnavailableError, check_finite_times, entry_key

#: Seconds between two prunes of every expired row (per cache object).
PRUNE_INTERVAL = 60.0


class DatastoreReplayCache:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._next_prune = 0.0

    def prune(self, *, now: float | None = None) -> int:
        """Delete every expired row; returns how many went."""
        at = time.time() if now is None else now
        check_finite_times(at, None)
        try:
            with transaction(self._engine) as conn:
                return conn.execute(delete(replay).where(replay.c.expires_at <= at)).rowcount
        except DatastoreUnavailableError as exc:
            raise ReplayCacheUnavailableError(exc.message) from None

    def check_and_store(
        self, namespace: str, value: str, expires_at: float, *, now: float | None = None
    ) -> bool:
        check_finite_times(expires_at, now)
        at = time.time() if now is None else now
        key = entry_key(namespace, value).hex()
        # The monotonic clock paces pruning: `now` may be a verifier's pinned time.
        if time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + PRUNE_INTERVAL
            self.prune(now=at)
        if expires_at > at and is_deferring(self._engine):
            if self._seen(key, at):
                return False  # refused now: nothing collected
            return defer_write(self._engine, lambda: self._store_deferred(key, at, expires_at))
        return self._store(key, at, expires_at)

    def _store(self, key: str, at: float, expires_at: float) -> bool:
        try:
            with transaction(self._engine) as conn:
                conn.execute(
                    delete(replay).where(and_(replay.c.key == key, replay.c.expires_at <= at))
                )
                if expires_at <= at:
                    return True  # already expired: nothing to remember
                conn.execute(insert(replay).values(key=key, expires_at=expires_at))
        except IntegrityError:
            return False
        except DatastoreUnavailableError as exc:
            raise ReplayCacheUnavailableError(exc.message) from None
        return True

    def _seen(self, key: str, at: float) -> bool:
        """A live row for ``key`` (the deferred check's early read)."""
        try:
            with transaction(self._engine, read_only=True) as conn:
                row = conn.execute(
                    select(replay.c.key).where(and_(replay.c.key == key, replay.c.expires_at > at))
                ).first()
        except DatastoreUnavailableError as exc:
            raise ReplayCacheUnavailableError(exc.message) from None
        return row is not None

    def _store_deferred(self, key: str, at: float, expires_at: float) -> None:
        """The deferred insert, run inside the caller's unit of work: a row stored
        since the early read (a concurrent call with the same proof) refuses the
        whole unit."""
        if not self._store(key, at, expires_at):
            raise ReplayError("the proof was used by a concurrent call")
