"""The audit trail (issue 8, "Operations"): every attestation and every credential
issued is one datastore row; each write of rows is logged as one JSON line per event
and requester on the logger ``custos.audit``, listing its rows (decision 0106: a batch
of 100 X.509-SVIDs is one line with 100 ``records``).

The rows are written first: when the write fails, the caller's issuance fails and the
credential is never returned (no unaudited credential); the line is written once the
rows are committed (after the caller's unit of work, decision 0105), so no log line
claims an issuance that did not happen. Refusals are audited as log lines only (decision 0033):
they issue nothing, and a row per refusal would let a misbehaving agent grow the
table without bound; the metrics count them.

The log message is the JSON object itself (``{"event": ..., "who": ...}``), so a
plain handler writes one parseable line; custody evidence stays out of the line
(it can be kilobytes) and lives in the row.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from custos._logging import get_logger
from custos.errors import CustosError
from custos.identity import Selector
from custos.server.datastore.records import AuditRecord
from custos.server.datastore.store import Datastore

#: What an audit record says happened.
EVENTS = ("attestation", "x509-svid", "wit", "jwt-svid", "agent-renewal")

log = get_logger("custos.audit")


class AuditError(CustosError):
    """An audit record the auditor refuses to write (unknown event)."""

    code = "audit_error"


@dataclass(frozen=True)
class AuditEvent:
    """One event to record: the arguments of :meth:`Auditor.record` as a value."""

    event: str
    who: str
    attestor: str
    selectors: tuple[Selector | str, ...]
    identity: str
    serial_or_jti: str
    not_after: float
    custody: str = ""
    evidence: str = ""
    #: "" (no tpm-custody key), "proven" or "unproven" (decision 0063)
    residency: str = ""


class Auditor:
    def __init__(self, datastore: Datastore) -> None:
        self.datastore = datastore

    def record(
        self,
        *,
        event: str,
        who: str,
        attestor: str,
        selectors: Iterable[Selector | str],
        identity: str,
        serial_or_jti: str,
        not_after: float,
        custody: str = "",
        evidence: str = "",
        residency: str = "",
    ) -> AuditRecord:
        """Write one event (row, then log line); raises if the row cannot be written."""
        return self.record_many(
            [
                AuditEvent(
                    event,
                    who,
                    attestor,
                    tuple(selectors),
                    identity,
                    serial_or_jti,
                    not_after,
                    custody,
                    evidence,
                    residency,
                )
            ]
        )[0]

    def record_many(self, events: Sequence[AuditEvent]) -> list[AuditRecord]:
        """Write several events in one transaction (a batch issuance): all or none.
        Inside a unit of work the rows are part of it, and their log lines wait for
        its commit."""
        for item in events:
            if item.event not in EVENTS:
                raise AuditError(f"unknown audit event {str(item.event)[:40]!r}")
        records = self.datastore.audit.record_many(
            [
                dict(
                    event=e.event,
                    who=e.who,
                    attestor=e.attestor,
                    selectors=e.selectors,
                    identity=e.identity,
                    serial_or_jti=e.serial_or_jti,
                    not_after=e.not_after,
                    custody=e.custody,
                    evidence=e.evidence,
                    residency=e.residency,
                )
                for e in events
            ]
        )
        if log.isEnabledFor(logging.INFO):
            # Inside a unit of work the rows are not committed yet: the lines wait
            # for the commit, so none claims an issuance that was rolled back.
            self.datastore.after_commit(lambda: _log_lines(records))
        return records

    def refused(
        self, *, event: str, identity: str, code: str, who: str = "", attestor: str = ""
    ) -> None:
        """A refused request (log line only): what was asked, by whom (or through which
        attestor, for an agent not yet attested), and the code."""
        if log.isEnabledFor(logging.INFO):
            fields = {"event": event, "outcome": "refused", "code": code}
            fields |= {"who": who, "identity": identity}
            if attestor:
                fields["attestor"] = attestor
            log.info(json.dumps(fields, separators=(",", ":")))


def _log_lines(records: Sequence[AuditRecord]) -> None:
    """One log record per event and requester of a write (decision 0106): a batch of
    100 X.509-SVIDs is one line listing its 100 rows, not 100 lines."""
    groups: dict[tuple[str, str, str, tuple[object, ...]], list[AuditRecord]] = {}
    for record in records:
        key = (record.event, record.who, record.attestor, record.selectors)
        groups.setdefault(key, []).append(record)
    for (event, who, attestor, selectors), rows in groups.items():
        log.info(_line(event, who, attestor, selectors, rows))


def _line(
    event: str, who: str, attestor: str, selectors: Sequence[object], rows: Sequence[AuditRecord]
) -> str:
    return json.dumps(
        {
            "event": event,
            "at": rows[0].at,
            "who": who,
            "attestor": attestor,
            "selectors": [str(s) for s in selectors],
            "records": [
                {
                    "seq": r.seq,
                    "identity": r.identity,
                    "serial_or_jti": r.serial_or_jti,
                    "not_after": r.not_after,
                    "custody": r.custody,
                    "residency": r.residency,
                }
                for r in rows
            ],
        },
        separators=(",", ":"),
    )
