"""Join tokens: one-time secrets an operator hands to a new node.

Only SHA-256 of the secret is stored (the secret is 256 random bits, so a
plain hash is enough: there is nothing to brute-force), and the token's id is
a separate random value, so listing or logging ids reveals no secret.
Consuming is one conditional UPDATE: of any number of concurrent consumers,
exactly one changes the row and wins.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid

from sqlalchemy import Engine, Row, delete, insert, select, update

from custos._numbers import finite_number
from custos.server.datastore.database import transaction
from custos.server.datastore.errors import JoinTokenError, NotFoundError
from custos.server.datastore.records import JoinToken, ttl
from custos.server.datastore.schema import join_tokens

#: A secret longer than this is not one we issued (token_urlsafe(32) is 43).
MAX_SECRET_LENGTH = 256


def _hash(secret: object) -> str:
    if not isinstance(secret, str) or not 0 < len(secret) <= MAX_SECRET_LENGTH:
        raise JoinTokenError(
            "a join token is a string of 1 to 256 characters", code="join_token_unknown"
        )
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def _now(now: float | None) -> float:
    return time.time() if now is None else finite_number(now, name="now")


class JoinTokenRepository:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def create(self, ttl_seconds: float, *, now: float | None = None) -> tuple[JoinToken, str]:
        """A new token valid for ``ttl_seconds``; returns it and its secret (shown once)."""
        lifetime = ttl(ttl_seconds, "join token ttl")
        at = _now(now)
        token = JoinToken(
            id=uuid.uuid4().hex, created_at=at, expires_at=at + lifetime, consumed_at=None
        )
        secret = secrets.token_urlsafe(32)
        with transaction(self._engine) as conn:
            conn.execute(
                insert(join_tokens).values(
                    id=token.id,
                    secret_sha256=_hash(secret),
                    created_at=token.created_at,
                    expires_at=token.expires_at,
                    consumed_at=None,
                )
            )
        return token, secret

    def consume(self, secret: str, *, now: float | None = None) -> JoinToken:
        """Use the token once. Codes: join_token_unknown / _used / _expired."""
        digest = _hash(secret)
        at = _now(now)
        with transaction(self._engine) as conn:
            won = conn.execute(
                update(join_tokens)
                .where(
                    join_tokens.c.secret_sha256 == digest,
                    join_tokens.c.consumed_at.is_(None),
                    join_tokens.c.expires_at > at,
                )
                .values(consumed_at=at)
            ).rowcount
            row = conn.execute(
                select(join_tokens).where(join_tokens.c.secret_sha256 == digest)
            ).first()
        if row is None:
            raise JoinTokenError("unknown join token", code="join_token_unknown")
        if won != 1:
            if row.consumed_at is not None:
                raise JoinTokenError(
                    f"join token {row.id} was already used", code="join_token_used"
                )
            raise JoinTokenError(f"join token {row.id} has expired", code="join_token_expired")
        return _token(row)

    def get(self, token_id: str) -> JoinToken:
        with transaction(self._engine, read_only=True) as conn:
            row = conn.execute(
                select(join_tokens).where(join_tokens.c.id == str(token_id)[:64])
            ).first()
        if row is None:
            raise NotFoundError(
                f"no join token {str(token_id)[:64]!r}", code="join_token_not_found"
            )
        return _token(row)

    def prune(self, *, now: float | None = None) -> int:
        """Delete expired tokens; returns how many."""
        with transaction(self._engine) as conn:
            return int(
                conn.execute(
                    delete(join_tokens).where(join_tokens.c.expires_at <= _now(now))
                ).rowcount
            )


def _token(row: Row[object]) -> JoinToken:
    return JoinToken(
        id=row.id, created_at=row.created_at, expires_at=row.expires_at, consumed_at=row.consumed_at
    )
