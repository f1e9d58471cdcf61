"""Audit rows say what happened and how the key was held (issue 8, "Operations" and
"Agent API"): ``event`` (attestation | x509-svid | wit | jwt-svid | agent-renewal),
``custody`` (the key custody tier the agent stated) and ``evidence`` (base64 of the
custody proof it sent, e.g. a TPM2_Certify statement; empty when none).

Rows written before this migration get empty strings: their event was an issuance
of an unrecorded kind, and no custody was stated.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN with a server default: SQLite and PostgreSQL both do it in
    # place (no table copy), and existing rows read the default.
    op.add_column("audit", sa.Column("event", sa.String(32), nullable=False, server_default=""))
    op.add_column("audit", sa.Column("custody", sa.String(16), nullable=False, server_default=""))
    op.add_column("audit", sa.Column("evidence", sa.Text, nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("audit") as batch:  # SQLite drops columns through a copy
        batch.drop_column("evidence")
        batch.drop_column("custody")
        batch.drop_column("event")
