"""TPM nodes: per EK hash, the activated attestation key and the clock of the last
accepted quote (issue 10; decision 0064).

A quote's TPMS_CLOCK_INFO (clock, resetCount, restartCount) must never go back
between two attestations of the same TPM with the same AK: a replayed or rolled-back
TPM state shows as a regression. (The TPM obfuscates resetCount and restartCount per
AK, so a newly activated AK starts a new baseline; decision 0068.) Several servers
share the database, so the check and the write are one transaction (``SELECT ...
FOR UPDATE``, SQLite's ``BEGIN IMMEDIATE``): of two servers accepting quotes of one
TPM at once, each compares against what the other committed, and a regression is
refused whichever server sees it.
"""

from __future__ import annotations

import re
import time

from sqlalchemy import Engine, Row, insert, select, update
from sqlalchemy.exc import IntegrityError

from custos._numbers import finite_number
from custos.server.datastore.database import defer_write, transaction
from custos.server.datastore.errors import DatastoreError, InvalidEntryError
from custos.server.datastore.records import TpmNode
from custos.server.datastore.schema import tpm_nodes

_EK_HASH = re.compile(r"[0-9a-f]{64}")
#: TPMS_CLOCK_INFO.clock is a UINT64 of milliseconds; the column is a signed BIGINT
#: (2^63 ms is 292 million years: a larger value is not a clock).
MAX_CLOCK = (1 << 63) - 1
#: resetCount and restartCount are UINT32.
MAX_COUNT = (1 << 32) - 1
#: Longest AK public area stored (an ECC P-256 TPM2B_PUBLIC is about 90 bytes).
MAX_AK_PUBLIC = 2048


class TpmClockRegressedError(DatastoreError):
    """The TPM's clock, resetCount or restartCount went back since the last accepted
    quote of this TPM; nothing was written."""

    code = "tpm_clock_regressed"


def regression(previous: tuple[int, int, int], current: tuple[int, int, int]) -> str | None:
    """Why ``current`` (clock, reset_count, restart_count) may not follow ``previous``,
    or None: resetCount never goes back; with the same resetCount, restartCount never
    goes back; the clock never goes back unless resetCount or restartCount increased
    (the rule of ``custos.tpm.verify.check_monotonic``)."""
    clock, reset, restart = previous
    new_clock, new_reset, new_restart = current
    if new_reset < reset:
        return f"resetCount went back from {reset} to {new_reset}"
    if new_reset == reset and new_restart < restart:
        return f"restartCount went back from {restart} to {new_restart}"
    if new_reset == reset and new_restart == restart and new_clock < clock:
        return f"the clock went back from {clock} to {new_clock} ms"
    return None


def _count(value: object, name: str, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise InvalidEntryError(
            f"{name} must be an int from 0 to {maximum}", code="invalid_tpm_clock"
        )
    return value


def _ek_hash(value: object) -> str:
    if not isinstance(value, str) or not _EK_HASH.fullmatch(value):
        raise InvalidEntryError(
            "ek_hash must be 64 lower-case hex characters (SHA-256)", code="invalid_ek_hash"
        )
    return value


class TpmNodeRepository:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def get(self, ek_hash: str) -> TpmNode | None:
        """The stored state of the TPM with this EK hash, None when never attested."""
        with transaction(self._engine, read_only=True) as conn:
            row = conn.execute(
                select(tpm_nodes).where(tpm_nodes.c.ek_hash == _ek_hash(ek_hash))
            ).first()
        return None if row is None else _node(row)

    def record(
        self,
        ek_hash: str,
        ak_public: bytes,
        clock: int,
        reset_count: int,
        restart_count: int,
        *,
        now: float | None = None,
    ) -> TpmNode:
        """Store an accepted quote's clock and the AK, unless it went back against the
        stored row of the same AK (:class:`TpmClockRegressedError`, code
        ``tpm_clock_regressed``; nothing written); another AK's row is replaced (its
        obfuscated counters are not comparable). Checked and written in one transaction.

        Inside :meth:`Datastore.deferring_writes` (node attestation, decision 0108) the
        stored row is checked now (the same refusal, early) and the write — checked
        again in its own transaction, atomically — is collected for the attestation's
        unit of work: an attestation refused after its quote writes no clock row."""
        if not isinstance(ak_public, bytes) or not 0 < len(ak_public) <= MAX_AK_PUBLIC:
            raise InvalidEntryError(
                f"ak_public must be 1 to {MAX_AK_PUBLIC} bytes", code="invalid_attestation_key"
            )
        node = TpmNode(
            ek_hash=_ek_hash(ek_hash),
            ak_public=ak_public,
            clock=_count(clock, "clock", MAX_CLOCK),
            reset_count=_count(reset_count, "reset_count", MAX_COUNT),
            restart_count=_count(restart_count, "restart_count", MAX_COUNT),
            updated_at=time.time() if now is None else finite_number(now, name="now"),
        )
        if defer_write(self._engine, lambda: self._write(node)):
            self._check(node, self.get(node.ek_hash))
            return node
        return self._write(node)

    def _write(self, node: TpmNode) -> TpmNode:
        values = {
            "ak_public": node.ak_public,
            "clock": node.clock,
            "reset_count": node.reset_count,
            "restart_count": node.restart_count,
            "updated_at": node.updated_at,
        }
        mine = select(tpm_nodes).where(tpm_nodes.c.ek_hash == node.ek_hash).with_for_update()
        with transaction(self._engine) as conn:
            row = conn.execute(mine).first()
            if row is None:
                # Two servers recording a TPM never seen before both find no row; the
                # second INSERT hits the primary key once the first commits, and is
                # checked against the first's row instead. A savepoint, so that the
                # transaction (maybe an attestation's unit of work) goes on after it.
                try:
                    with conn.begin_nested():
                        conn.execute(insert(tpm_nodes).values(ek_hash=node.ek_hash, **values))
                    return node
                except IntegrityError:
                    row = conn.execute(mine).one()
            self._check(node, _node(row))
            conn.execute(
                update(tpm_nodes).where(tpm_nodes.c.ek_hash == node.ek_hash).values(values)
            )
            return node

    @staticmethod
    def _check(node: TpmNode, stored: TpmNode | None) -> None:
        """Refuse ``node`` if its clock went back against ``stored`` of the same AK."""
        if stored is None:
            return
        # Only quotes by one AK are comparable: a TPM obfuscates resetCount and
        # restartCount in every quote by an AK outside the endorsement / platform
        # hierarchy with a value derived from that AK's name (TPM 2.0 Part 1,
        # "Obfuscation"). A newly activated AK starts a new baseline (decision 0068).
        if stored.ak_public != node.ak_public:
            return
        why = regression(
            (stored.clock, stored.reset_count, stored.restart_count),
            (node.clock, node.reset_count, node.restart_count),
        )
        if why is not None:
            raise TpmClockRegressedError(
                f"TPM {node.ek_hash[:16]}...: {why} since its last attestation"
            )


def _node(row: Row[object]) -> TpmNode:
    return TpmNode(
        ek_hash=row.ek_hash,
        ak_public=bytes(row.ak_public),
        clock=int(row.clock),
        reset_count=int(row.reset_count),
        restart_count=int(row.restart_count),
        updated_at=row.updated_at,
    )


__all__ = ["TpmClockRegressedError", "TpmNodeRepository", "regression"]
