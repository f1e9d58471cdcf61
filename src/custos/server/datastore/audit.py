"""The audit trail: one row per attestation and per credential issued (who, how,
what, until when, and how the key was held)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Engine, Row, insert, select

from custos._numbers import finite_number
from custos.identity import Selector
from custos.server.datastore.database import transaction
from custos.server.datastore.errors import DatastoreError, InvalidEntryError
from custos.server.datastore.records import AuditRecord, selector_tuple
from custos.server.datastore.schema import audit

#: Column widths (schema.py); custody evidence is a TPM2_Certify statement and its
#: signature in base64, well under 16 KiB (the issuer caps each blob at 4 KiB).
_LIMITS = {
    "who": 2048,
    "attestor": 256,
    "identity": 2048,
    "serial_or_jti": 256,
    "event": 32,
    "custody": 16,
    "evidence": 16384,
    "residency": 16,
}
#: What an audit row may say about a key's TPM residency (decision 0063).
RESIDENCIES = ("", "proven", "unproven")
#: Every column an insert writes (all but ``seq``), returned to match keys to rows.
_INSERTED = tuple(c for c in audit.columns if c.name != "seq")


class AuditLog:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def record(
        self,
        *,
        who: str,
        attestor: str,
        selectors: Iterable[Selector | str],
        identity: str,
        serial_or_jti: str,
        not_after: float,
        event: str = "",
        custody: str = "",
        evidence: str = "",
        residency: str = "",
        now: float | None = None,
    ) -> AuditRecord:
        """Write one record."""
        fields: dict[str, Any] = dict(
            who=who,
            attestor=attestor,
            selectors=selectors,
            identity=identity,
            serial_or_jti=serial_or_jti,
            not_after=not_after,
            event=event,
            custody=custody,
            evidence=evidence,
            residency=residency,
        )
        return self.record_many([fields], now=now)[0]

    def record_many(
        self, items: Sequence[Mapping[str, Any]], *, now: float | None = None
    ) -> list[AuditRecord]:
        """Write several records (each the keyword arguments of :meth:`record`) in one
        transaction: every one is checked first, then all are written or none."""
        at = time.time() if now is None else finite_number(now, name="now")
        # A batch's rows share one agent, so its selectors are parsed and encoded
        # once per distinct value, not once per row.
        encoded: dict[object, tuple[tuple[Selector, ...], str]] = {}
        records = [_checked(item, at, encoded) for item in items]
        if not records:
            return []
        rows = [{**values, "selectors": selectors_json} for values, selectors_json in records]
        # One multi-row INSERT for the whole batch (SQLAlchemy's "insertmanyvalues"):
        # a batch of 100 SVIDs costs one statement, not 100. RETURNING gives its rows in
        # no promised order (SQLAlchemy's sort_by_parameter_order falls back to one
        # INSERT per row on SQLite), so each key comes back with the row's columns and
        # is matched to its row by them; rows alike in every column are interchangeable.
        statement = insert(audit).returning(audit.c.seq, *_INSERTED)
        with transaction(self._engine) as conn:
            returned = conn.execute(statement, rows).all()
        keys: dict[tuple[object, ...], list[int]] = {}
        for seq, *content in returned:
            keys.setdefault(tuple(content), []).append(int(seq))
        for same in keys.values():
            same.sort(reverse=True)  # rows alike get their keys in the batch's order
        try:
            seqs = [keys[tuple(row[c.name] for c in _INSERTED)].pop() for row in rows]
        except (KeyError, IndexError):  # pragma: no cover - a driver bug, not an input
            raise DatastoreError(
                "the audit insert returned other rows than it was given", code="datastore_bug"
            ) from None
        return [
            AuditRecord(seq=seq, **values) for (values, _), seq in zip(records, seqs, strict=True)
        ]

    def since(self, seq: int = 0, *, limit: int = 1000) -> list[AuditRecord]:
        """Audit records after ``seq``, oldest first."""
        with transaction(self._engine, read_only=True) as conn:
            rows = conn.execute(
                select(audit).where(audit.c.seq > seq).order_by(audit.c.seq).limit(limit)
            ).all()
        return [_record(r) for r in rows]


_NOT_SEEN: tuple[None, str] = (None, "")


def _checked(
    item: Mapping[str, Any], at: float, encoded: dict[object, tuple[tuple[Selector, ...], str]]
) -> tuple[dict[str, Any], str]:
    """A record's checked fields (all but ``seq``, which the insert gives it) and its
    selectors as the row stores them."""
    texts = {name: item.get(name, "") for name in _LIMITS}
    for name, value in texts.items():
        if not isinstance(value, str) or len(value) > _LIMITS[name]:
            raise InvalidEntryError(
                f"audit {name} must be a string of at most {_LIMITS[name]} characters",
                code="invalid_audit_record",
            )
    if texts["residency"] not in RESIDENCIES:
        raise InvalidEntryError(
            "audit residency must be '', 'proven' or 'unproven'", code="invalid_audit_record"
        )
    raw = item.get("selectors", ())
    remember = type(raw) is tuple  # a value (a list, a generator) is parsed as it comes
    try:
        selectors, selectors_json = encoded[raw] if remember else _NOT_SEEN
    except (KeyError, TypeError):  # not seen in this batch, or holds something unhashable
        selectors, selectors_json = _NOT_SEEN
    if selectors is None:
        selectors = selector_tuple(raw, required=False)
        selectors_json = json.dumps([str(s) for s in selectors])
        if remember:
            encoded[raw] = (selectors, selectors_json)
    values = {
        **texts,
        "at": at,
        "selectors": selectors,
        "not_after": finite_number(item.get("not_after"), name="not_after"),
    }
    return values, selectors_json


def _record(row: Row[object]) -> AuditRecord:
    return AuditRecord(
        seq=row.seq,
        at=row.at,
        who=row.who,
        attestor=row.attestor,
        selectors=tuple(Selector.parse(s) for s in json.loads(row.selectors)),
        identity=row.identity,
        serial_or_jti=row.serial_or_jti,
        not_after=row.not_after,
        event=row.event,
        custody=row.custody,
        evidence=row.evidence,
        residency=row.residency,
    )
