"""Identical entries are refused (SPIRE's "entry already exists"): entries get
``identity_hash``, a hash of the SPIFFE ID, the parent ID and the selector set, with a
unique index.

Existing entries get their hash here. Where a database already holds identical
entries, the first by id gets it and the others keep NULL (a unique index never finds
two NULLs equal): nothing is deleted, and a warning names them for an operator to
delete; an update of one of them is refused while its twin exists.
"""

from __future__ import annotations

import hashlib
import json
import logging

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

log = logging.getLogger("custos.server.datastore")


def _identity_hash(spiffe_id: str, parent_id: str, selectors: list[tuple[str, str]]) -> str:
    # Frozen copy of records.identity_hash as of this revision (history must not move).
    canonical = json.dumps([spiffe_id, parent_id, sorted(set(selectors))], separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def upgrade() -> None:
    op.add_column("entries", sa.Column("identity_hash", sa.String(64), nullable=True))
    conn = op.get_bind()
    selectors: dict[str, list[tuple[str, str]]] = {}
    for entry_id, type_, value in conn.execute(
        sa.text("SELECT entry_id, type, value FROM entry_selectors")
    ):
        selectors.setdefault(entry_id, []).append((type_, value))
    seen: dict[str, str] = {}
    for entry_id, spiffe_id, parent_id in conn.execute(
        sa.text("SELECT id, spiffe_id, parent_id FROM entries ORDER BY id")
    ).all():
        digest = _identity_hash(spiffe_id, parent_id, selectors.get(entry_id, []))
        if digest in seen:
            log.warning(
                "entry %s is identical to entry %s (SPIFFE ID, parent, selectors): "
                "delete one of them",
                entry_id,
                seen[digest],
            )
            continue
        seen[digest] = entry_id
        conn.execute(
            sa.text("UPDATE entries SET identity_hash = :h WHERE id = :id"),
            {"h": digest, "id": entry_id},
        )
    op.create_index("ux_entries_identity_hash", "entries", ["identity_hash"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_entries_identity_hash", table_name="entries")
    with op.batch_alter_table("entries") as batch:  # SQLite drops columns through a copy
        batch.drop_column("identity_hash")
