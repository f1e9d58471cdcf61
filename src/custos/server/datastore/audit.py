"""The audit trail: one row per credential issued (who, how, what, until when)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable

from sqlalchemy import Engine, insert, select

from custos._numbers import finite_number
from custos.identity import Selector
from custos.server.datastore.database import inserted_key, transaction
from custos.server.datastore.errors import InvalidEntryError
from custos.server.datastore.records import AuditRecord, selector_tuple
from custos.server.datastore.schema import audit

_LIMITS = {"who": 2048, "attestor": 256, "identity": 2048, "serial_or_jti": 256}


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
        now: float | None = None,
    ) -> AuditRecord:
        texts = {
            "who": who,
            "attestor": attestor,
            "identity": identity,
            "serial_or_jti": serial_or_jti,
        }
        for name, value in texts.items():
            if not isinstance(value, str) or len(value) > _LIMITS[name]:
                raise InvalidEntryError(
                    f"audit {name} must be a string of at most {_LIMITS[name]} characters",
                    code="invalid_audit_record",
                )
        sels = selector_tuple(selectors, required=False)
        at = time.time() if now is None else finite_number(now, name="now")
        end = finite_number(not_after, name="not_after")
        with transaction(self._engine) as conn:
            seq = inserted_key(
                conn.execute(
                    insert(audit).values(
                        at=at, selectors=json.dumps([str(s) for s in sels]), not_after=end, **texts
                    )
                )
            )
        return AuditRecord(seq=seq, at=at, selectors=sels, not_after=end, **texts)

    def since(self, seq: int = 0, *, limit: int = 1000) -> list[AuditRecord]:
        """Audit records after ``seq``, oldest first."""
        with transaction(self._engine, read_only=True) as conn:
            rows = conn.execute(
                select(audit).where(audit.c.seq > seq).order_by(audit.c.seq).limit(limit)
            ).all()
        return [
            AuditRecord(
                seq=r.seq,
                at=r.at,
                who=r.who,
                attestor=r.attestor,
                selectors=tuple(Selector.parse(s) for s in json.loads(r.selectors)),
                identity=r.identity,
                serial_or_jti=r.serial_or_jti,
                not_after=r.not_after,
            )
            for r in rows
        ]
