"""The :class:`Datastore`: one database, its repositories, opened and migrated."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from types import TracebackType

from custos.identity import TrustDomain, coerce_trust_domain
from custos.server.datastore.agents import AgentRepository
from custos.server.datastore.audit import AuditLog
from custos.server.datastore.database import (
    DeferredWrites,
    after_commit,
    deferring_writes,
    make_engine,
    migrate,
    parse_url,
    unit_of_work,
)
from custos.server.datastore.entries import EntryRepository
from custos.server.datastore.replay import DatastoreReplayCache
from custos.server.datastore.server_names import ServerNameRepository
from custos.server.datastore.signing_keys import SigningKeyRepository
from custos.server.datastore.tokens import JoinTokenRepository
from custos.server.datastore.tpm_nodes import TpmNodeRepository


class Datastore:
    """The server's datastore on SQLite (``sqlite:///<path>``) or PostgreSQL.

    ``entries``, ``join_tokens``, ``agents``, ``audit``, ``signing_keys`` (key
    metadata), ``server_names`` (every server's DNS name), ``tpm_nodes`` (each TPM's
    last accepted clock) and ``replay`` (a
    :class:`~custos.wimse.replay.ReplayCache`) share one connection pool.
    Each method is its own transaction, unless called inside :meth:`unit_of_work`;
    thread-safe.
    """

    def __init__(self, url: str, trust_domain: TrustDomain | str) -> None:
        self.trust_domain = coerce_trust_domain(trust_domain)
        parsed = parse_url(url)
        self.backend = parsed.get_backend_name()
        self._engine = make_engine(parsed)
        try:
            migrate(self._engine)
        except BaseException:
            self._engine.dispose()
            raise
        self.entries = EntryRepository(self._engine, self.trust_domain)
        self.join_tokens = JoinTokenRepository(self._engine)
        self.agents = AgentRepository(self._engine, self.trust_domain)
        self.audit = AuditLog(self._engine)
        self.replay = DatastoreReplayCache(self._engine)
        self.signing_keys = SigningKeyRepository(self._engine)
        self.server_names = ServerNameRepository(self._engine)
        self.tpm_nodes = TpmNodeRepository(self._engine)

    @classmethod
    def open(cls, url: str, *, trust_domain: TrustDomain | str) -> Datastore:
        """Connect, run any pending migrations, and return the datastore.

        Raises UnsupportedDatastoreURLError for another scheme and
        DatastoreUnavailableError when the database cannot be reached.
        """
        return cls(url, trust_domain)

    def unit_of_work(self) -> AbstractContextManager[None]:
        """``with datastore.unit_of_work():`` every repository call made inside it in
        this thread is one transaction, committed at the end, rolled back whole when
        anything inside raises (decision 0105): one commit for an issuance's audit
        rows and signing-key bookkeeping, or for an attestation's writes."""
        return unit_of_work(self._engine)

    def deferring_writes(self) -> AbstractContextManager[DeferredWrites]:
        """``with datastore.deferring_writes() as writes:`` the writes that support it
        (the TPM clock row) made inside it — here and in worker threads started here —
        are checked now and collected, not written; ``writes.run()`` inside a later
        :meth:`unit_of_work` writes them with the rest (decision 0108)."""
        return deferring_writes(self._engine)

    def after_commit(self, work: Callable[[], None]) -> None:
        """Run ``work`` once this thread's open unit of work commits (never if it rolls
        back); at once outside one. The audit log's lines are written so."""
        after_commit(self._engine, work)

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Datastore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
