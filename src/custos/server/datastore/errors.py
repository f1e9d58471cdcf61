"""The datastore's errors: each one a stable ``code`` under :class:`CustosError`."""

from __future__ import annotations

from custos.errors import CustosError


class DatastoreError(CustosError):
    """Base of every datastore error."""

    code = "datastore_error"


class UnsupportedDatastoreURLError(DatastoreError, ValueError):
    """The URL is not ``sqlite:///<path>`` or ``postgresql://...``."""

    code = "unsupported_datastore_url"


class DatastoreUnavailableError(DatastoreError):
    """The database cannot be reached (stopped, network gone, disk locked)."""

    code = "datastore_unavailable"


class InvalidEntryError(DatastoreError, ValueError):
    """A registration entry (or agent record) would be invalid; nothing was written."""

    code = "invalid_entry"


class NotFoundError(DatastoreError, LookupError):
    """No row with that id."""

    code = "not_found"


class RevisionConflictError(DatastoreError):
    """The entry changed since it was read (stale revision); nothing was written."""

    code = "revision_conflict"


class EntryExistsError(DatastoreError):
    """An entry with the same SPIFFE ID, parent ID and selector set exists already
    (SPIRE's "entry already exists"): ALREADY_EXISTS on the admin API."""

    code = "entry_exists"


class JoinTokenError(DatastoreError):
    """A join token is unknown, already used, or expired (``code`` says which)."""

    code = "join_token_invalid"


__all__ = [
    "DatastoreError",
    "DatastoreUnavailableError",
    "InvalidEntryError",
    "JoinTokenError",
    "NotFoundError",
    "RevisionConflictError",
    "UnsupportedDatastoreURLError",
]
