"""The current tables (SQLAlchemy Core). Migrations under ``migrations/versions``
create them; a change here needs a new migration.

Times are epoch seconds (float), the unit of every other custos clock.
Selector lists are stored one row per selector so "entries with selector X"
is an index lookup.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    false,
)

metadata = MetaData()

#: An autoincrementing key: BIGINT on PostgreSQL; SQLite's ROWID alias must be INTEGER.
SequenceKey = BigInteger().with_variant(Integer(), "sqlite")

entries = Table(
    "entries",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("spiffe_id", String(2048), nullable=False, index=True),
    Column("parent_id", String(2048), nullable=False, index=True),
    Column("x509_svid_ttl", Float, nullable=False),
    Column("jwt_svid_ttl", Float, nullable=False),
    Column("wit_ttl", Float, nullable=False),
    Column("dns_names", Text, nullable=False),  # JSON list
    Column("key_custody", String(16), nullable=False),
    Column("hint", String(1024), nullable=False),
    Column("admin", Boolean, nullable=False),
    Column("downstream", Boolean, nullable=False),
    Column("expires_at", Float, nullable=True),
    Column("revision", Integer, nullable=False),
    Column("change_seq", SequenceKey, nullable=False),
    # records.identity_hash of (spiffe_id, parent_id, selector set); unique: an
    # identical entry is refused even when two servers write it at once. NULL only
    # for duplicates that existed before migration 0004 (NULLs are never equal).
    Column("identity_hash", String(64), nullable=True),
    Index("ux_entries_identity_hash", "identity_hash", unique=True),
    # migration 0006: issue only for keys a TPM proved resident (decision 0063)
    Column("require_residency", Boolean, nullable=False, server_default=false()),
)

entry_selectors = Table(
    "entry_selectors",
    metadata,
    Column(
        "entry_id",
        String(64),
        ForeignKey("entries.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("type", String(256), primary_key=True),
    Column("value", String(2048), primary_key=True),
    Index("ix_entry_selectors_type_value", "type", "value"),
)

entry_changes = Table(
    "entry_changes",
    metadata,
    Column("seq", SequenceKey, primary_key=True, autoincrement=True),
    Column("entry_id", String(64), nullable=False),
    Column("op", String(8), nullable=False),  # create | update | delete
    Column("at", Float, nullable=False),
    sqlite_autoincrement=True,  # never reuse a sequence number after a delete
)

join_tokens = Table(
    "join_tokens",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("secret_sha256", String(64), nullable=False, unique=True),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("consumed_at", Float, nullable=True),
)

agents = Table(
    "agents",
    metadata,
    Column("id", String(2048), primary_key=True),
    Column("attestor", String(256), nullable=False),
    Column("selectors", Text, nullable=False),  # JSON list of "type:value"
    Column("serial", String(128), nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("evicted", Boolean, nullable=False),
    Column("banned", Boolean, nullable=False),
    Column("updated_at", Float, nullable=False),
    # migration 0006: the TPM2B_PUBLIC of the AK the node's TPM activated (tpm attestor);
    # NULL for an agent without one (a join-token agent)
    Column("attestation_key", LargeBinary, nullable=True),
)

replay = Table(
    "replay",
    metadata,
    Column("key", String(64), primary_key=True),  # sha256(namespace NUL value), hex
    Column("expires_at", Float, nullable=False, index=True),
)

audit = Table(
    "audit",
    metadata,
    Column("seq", SequenceKey, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("who", String(2048), nullable=False),
    Column("attestor", String(256), nullable=False),
    Column("selectors", Text, nullable=False),  # JSON list of "type:value"
    Column("identity", String(2048), nullable=False),
    Column("serial_or_jti", String(256), nullable=False),
    Column("not_after", Float, nullable=False),
    # migration 0003: what happened, and the custody tier + evidence the agent sent
    Column("event", String(32), nullable=False, server_default=""),
    Column("custody", String(16), nullable=False, server_default=""),
    Column("evidence", Text, nullable=False, server_default=""),
    # migration 0006: "" (not a tpm-custody key) | proven | unproven (decision 0063)
    Column("residency", String(16), nullable=False, server_default=""),
    sqlite_autoincrement=True,
)

#: Signing-key metadata (migration 0002); key material lives in the key store only.
signing_keys = Table(
    "signing_keys",
    metadata,
    Column("kid", String(64), primary_key=True),
    Column("purpose", String(16), nullable=False),  # x509-ca | jwt-svid | wit
    Column("key_name", String(128), nullable=False, unique=True),
    Column("alg", String(16), nullable=False),
    Column("status", String(16), nullable=False),  # published | active | retired
    Column("created_at", Float, nullable=False),
    Column("published_at", Float, nullable=False),
    Column("active_from", Float, nullable=True),
    Column("retired_at", Float, nullable=True),
    Column("last_not_after", Float, nullable=True),
    Column("certificate", Text, nullable=True),  # PEM root of an x509-ca key (public)
)

#: The DNS names the servers of this database answer to (migration 0005): no
#: entry and no workload certificate may carry one (decision 0055).
server_names = Table(
    "server_names",
    metadata,
    Column("dns_name", String(253), primary_key=True),  # lower case, no final dot
    Column("recorded_at", Float, nullable=False),
)

#: What the last accepted quote of each TPM said about its clock (migration 0006): a
#: later attestation whose clock, resetCount or restartCount went back is refused,
#: by whichever server of this database sees it (decision 0064).
tpm_nodes = Table(
    "tpm_nodes",
    metadata,
    Column("ek_hash", String(64), primary_key=True),  # lower-case hex SHA-256 of the EK SPKI
    Column("ak_public", LargeBinary, nullable=False),  # TPM2B_PUBLIC of the activated AK
    Column("clock", BigInteger, nullable=False),  # milliseconds (TPMS_CLOCK_INFO.clock)
    Column("reset_count", BigInteger, nullable=False),
    Column("restart_count", BigInteger, nullable=False),
    Column("updated_at", Float, nullable=False),
)
