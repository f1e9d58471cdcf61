"""The one "now" rule of the x509 package: given times must be timezone-aware."""

from __future__ import annotations

from datetime import UTC, datetime

from custos.errors import CustosError


def utcnow(now: datetime | None, error: type[CustosError]) -> datetime:
    """``now`` in UTC (the current time when None); a naive or non-datetime
    ``now`` is an ``error`` (the caller's own error class)."""
    if now is None:
        return datetime.now(UTC)
    if not isinstance(now, datetime):
        raise error(f"'now' must be a datetime, not {type(now).__name__}")
    if now.tzinfo is None:
        raise error("'now' must be timezone-aware")
    return now.astimezone(UTC)
