"""TPM node attestation (issue 10):

- ``agents.attestation_key``: the TPM2B_PUBLIC of the attestation key (AK) the node's
  TPM activated; NULL for an agent attested without one (a join token);
- ``entries.require_residency``: issue only for keys a TPM proved resident
  (decision 0063); existing entries get false;
- ``audit.residency``: "" (no ``tpm``-custody key), ``proven`` or ``unproven``; older
  rows get "";
- ``tpm_nodes``: per EK hash, the AK and the clock of the last accepted quote, so a
  TPM whose clock, resetCount or restartCount goes back is refused by every server of
  the database (decision 0064).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN (nullable, or with a server default): in place on both backends.
    op.add_column("agents", sa.Column("attestation_key", sa.LargeBinary, nullable=True))
    op.add_column(
        "entries",
        sa.Column("require_residency", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    op.add_column("audit", sa.Column("residency", sa.String(16), nullable=False, server_default=""))
    op.create_table(
        "tpm_nodes",
        sa.Column("ek_hash", sa.String(64), primary_key=True),
        sa.Column("ak_public", sa.LargeBinary, nullable=False),
        sa.Column("clock", sa.BigInteger, nullable=False),
        sa.Column("reset_count", sa.BigInteger, nullable=False),
        sa.Column("restart_count", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("tpm_nodes")
    for table, column in (
        ("audit", "residency"),
        ("entries", "require_residency"),
        ("agents", "attestation_key"),
    ):
        with op.batch_alter_table(table) as batch:  # SQLite drops columns through a copy
            batch.drop_column(column)
