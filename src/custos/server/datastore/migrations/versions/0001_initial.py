"""The first schema: entries (+ selectors, change feed), join tokens, agents,
replay cache, audit.

Frozen history: written out column by column (not ``metadata.create_all``) so
that a later change to ``schema.py`` comes with its own migration and this one
still builds exactly the first schema.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "entries",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("spiffe_id", sa.String(2048), nullable=False, index=True),
        sa.Column("parent_id", sa.String(2048), nullable=False, index=True),
        sa.Column("x509_svid_ttl", sa.Float, nullable=False),
        sa.Column("jwt_svid_ttl", sa.Float, nullable=False),
        sa.Column("wit_ttl", sa.Float, nullable=False),
        sa.Column("dns_names", sa.Text, nullable=False),
        sa.Column("key_custody", sa.String(16), nullable=False),
        sa.Column("hint", sa.String(1024), nullable=False),
        sa.Column("admin", sa.Boolean, nullable=False),
        sa.Column("downstream", sa.Boolean, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=True),
        sa.Column("revision", sa.Integer, nullable=False),
        sa.Column("change_seq", _SEQ, nullable=False),
    )
    op.create_table(
        "entry_selectors",
        sa.Column(
            "entry_id",
            sa.String(64),
            sa.ForeignKey("entries.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("type", sa.String(256), primary_key=True),
        sa.Column("value", sa.String(2048), primary_key=True),
    )
    op.create_index("ix_entry_selectors_type_value", "entry_selectors", ["type", "value"])
    op.create_table(
        "entry_changes",
        sa.Column("seq", _SEQ, primary_key=True, autoincrement=True),
        sa.Column("entry_id", sa.String(64), nullable=False),
        sa.Column("op", sa.String(8), nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "join_tokens",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("secret_sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("consumed_at", sa.Float, nullable=True),
    )
    op.create_table(
        "agents",
        sa.Column("id", sa.String(2048), primary_key=True),
        sa.Column("attestor", sa.String(256), nullable=False),
        sa.Column("selectors", sa.Text, nullable=False),
        sa.Column("serial", sa.String(128), nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("evicted", sa.Boolean, nullable=False),
        sa.Column("banned", sa.Boolean, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "replay",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("expires_at", sa.Float, nullable=False, index=True),
    )
    op.create_table(
        "audit",
        sa.Column("seq", _SEQ, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("who", sa.String(2048), nullable=False),
        sa.Column("attestor", sa.String(256), nullable=False),
        sa.Column("selectors", sa.Text, nullable=False),
        sa.Column("identity", sa.String(2048), nullable=False),
        sa.Column("serial_or_jti", sa.String(256), nullable=False),
        sa.Column("not_after", sa.Float, nullable=False),
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    for table in ("audit", "replay", "agents", "join_tokens", "entry_changes"):
        op.drop_table(table)
    op.drop_table("entry_selectors")
    op.drop_table("entries")
