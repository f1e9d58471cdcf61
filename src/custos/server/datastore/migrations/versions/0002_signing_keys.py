"""Signing-key metadata (issue 8, "Running it"): which keys exist for the CA,
JWT-SVIDs and WITs, their state and the latest expiry of what each signed.

Only public facts are stored (kid, key name in the key store, dates, and for a
CA key its public root certificate); key material stays in the key store.
Partial unique indexes keep at most one ``published`` and one ``active`` key
per purpose, whatever servers race.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "signing_keys",
        sa.Column("kid", sa.String(64), primary_key=True),
        sa.Column("purpose", sa.String(16), nullable=False),
        sa.Column("key_name", sa.String(128), nullable=False, unique=True),
        sa.Column("alg", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("published_at", sa.Float, nullable=False),
        sa.Column("active_from", sa.Float, nullable=True),
        sa.Column("retired_at", sa.Float, nullable=True),
        sa.Column("last_not_after", sa.Float, nullable=True),
        sa.Column("certificate", sa.Text, nullable=True),
    )
    for status in ("published", "active"):
        op.create_index(
            f"ux_signing_keys_one_{status}",
            "signing_keys",
            ["purpose"],
            unique=True,
            sqlite_where=sa.text(f"status = '{status}'"),
            postgresql_where=sa.text(f"status = '{status}'"),
        )


def downgrade() -> None:
    op.drop_table("signing_keys")
