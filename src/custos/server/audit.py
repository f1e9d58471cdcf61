"""The audit trail (issue 8, "Operations"): every attestation and every credential
issued is one JSON log line on the logger ``custos.audit`` and one datastore row.

The row is written first: when the write fails, the caller's issuance fails and the
credential is never returned (no unaudited credential), and no log line claims an
issuance that did not happen. Refusals are audited as log lines only (decision 0033):
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
        """Write several events in one transaction (a batch issuance): all or none."""
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
            for record in records:
                log.info(_line(record))
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


def _line(record: AuditRecord) -> str:
    return json.dumps(
        {
            "event": record.event,
            "seq": record.seq,
            "at": record.at,
            "who": record.who,
            "attestor": record.attestor,
            "selectors": [str(s) for s in record.selectors],
            "identity": record.identity,
            "serial_or_jti": record.serial_or_jti,
            "not_after": record.not_after,
            "custody": record.custody,
            "residency": record.residency,
        },
        separators=(",", ":"),
    )
