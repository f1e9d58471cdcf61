"""The server's datastore (issue 8): SQLAlchemy 2 Core on SQLite or PostgreSQL
(psycopg 3), with Alembic migrations shipped in the package and run at open.

``Datastore.open(url, trust_domain=...)`` gives ``entries`` (registration
entries, optimistic concurrency, change feed), ``join_tokens`` (consumed once,
atomically), ``agents``, ``audit``, ``tpm_nodes`` and ``replay`` (a shared
:class:`custos.wimse.replay.ReplayCache`). See docs/server-datastore.md.
"""

from custos._extras import extra_needed
from custos.server.datastore.errors import (
    DatastoreError,
    DatastoreUnavailableError,
    EntryExistsError,
    InvalidEntryError,
    JoinTokenError,
    NotFoundError,
    RevisionConflictError,
    UnsupportedDatastoreURLError,
)
from custos.server.datastore.records import (
    KEY_CUSTODIES,
    Agent,
    AuditRecord,
    EntryChange,
    JoinToken,
    RegistrationEntry,
    TpmNode,
)

# SQLAlchemy, Alembic and psycopg come with the 'server' extra (decision 0025).
with extra_needed("server"):
    from custos.server.datastore.store import Datastore

__all__ = [
    "KEY_CUSTODIES",
    "Agent",
    "AuditRecord",
    "Datastore",
    "DatastoreError",
    "DatastoreUnavailableError",
    "EntryChange",
    "EntryExistsError",
    "InvalidEntryError",
    "JoinToken",
    "JoinTokenError",
    "NotFoundError",
    "RegistrationEntry",
    "RevisionConflictError",
    "TpmNode",
    "UnsupportedDatastoreURLError",
]
