"""The DNS names the servers of this database answer to (decision 0055): each
server records its ``agent_api.dns_name`` at start, and every server refuses
every recorded name in entries and workload certificates (servers sharing a
database may be configured with different names).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "server_names",
        sa.Column("dns_name", sa.String(253), primary_key=True),  # lower case, no final dot
        sa.Column("recorded_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("server_names")
