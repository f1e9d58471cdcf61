"""Join tokens: only a hash stored, consumed exactly once (threads and
processes racing), expiry, and hostile secrets."""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest
from sqlalchemy import create_engine, text

from custos.server.datastore import Datastore, JoinTokenError, NotFoundError

from .conftest import TRUST_DOMAIN


def _all_stored_text(url: str) -> str:
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT * FROM join_tokens")).all()
    finally:
        engine.dispose()
    return repr(rows)


def test_secret_is_not_stored_and_id_is_not_the_secret(store: Datastore, store_url: str) -> None:
    token, secret = store.join_tokens.create(600)
    assert token.id != secret and token.id not in secret
    assert len(secret) >= 43  # 256 random bits
    stored = _all_stored_text(store_url)
    assert token.id in stored
    assert secret not in stored
    assert store.join_tokens.get(token.id).consumed_at is None


def test_consume_once(store: Datastore) -> None:
    token, secret = store.join_tokens.create(600, now=1000.0)
    used = store.join_tokens.consume(secret, now=1001.0)
    assert (used.id, used.consumed_at) == (token.id, 1001.0)
    with pytest.raises(JoinTokenError) as err:
        store.join_tokens.consume(secret, now=1002.0)
    assert err.value.code == "join_token_used"


def test_expired_token_is_refused_and_pruned(store: Datastore) -> None:
    token, secret = store.join_tokens.create(60, now=1000.0)
    with pytest.raises(JoinTokenError) as err:
        store.join_tokens.consume(secret, now=1060.0)
    assert err.value.code == "join_token_expired"
    assert store.join_tokens.get(token.id).consumed_at is None
    assert store.join_tokens.prune(now=1060.0) == 1
    with pytest.raises(NotFoundError):
        store.join_tokens.get(token.id)


@pytest.mark.parametrize("secret", ["", "x" * 257, None, b"bytes", 7, "unknown-secret"])
def test_unknown_or_hostile_secret(store: Datastore, secret: object) -> None:
    with pytest.raises(JoinTokenError) as err:
        store.join_tokens.consume(secret)  # type: ignore[arg-type]
    assert err.value.code == "join_token_unknown"


@pytest.mark.parametrize("ttl", [0, -1, float("nan"), float("inf"), True])
def test_bad_ttl(store: Datastore, ttl: object) -> None:
    with pytest.raises(ValueError):
        store.join_tokens.create(ttl)  # type: ignore[arg-type]


def test_threads_race_exactly_one_wins(store: Datastore) -> None:
    _, secret = store.join_tokens.create(600)
    barrier = threading.Barrier(8)
    results: list[str] = []

    def consume() -> None:
        barrier.wait()
        try:
            store.join_tokens.consume(secret)
            results.append("won")
        except JoinTokenError as exc:
            results.append(exc.code)

    threads = [threading.Thread(target=consume) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["join_token_used"] * 7 + ["won"]


def _consume_in_child(url: str, secret: str, start: float) -> str:
    # Each child is a separate process with its own connection pool.
    with Datastore.open(url, trust_domain=TRUST_DOMAIN) as ds:
        time.sleep(max(0.0, start - time.time()))  # line the children up
        try:
            ds.join_tokens.consume(secret)
            return "won"
        except JoinTokenError as exc:
            return exc.code


def test_processes_race_exactly_one_wins(store: Datastore, store_url: str) -> None:
    _, secret = store.join_tokens.create(600)
    start = time.time() + 2.0
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        results = pool.starmap(_consume_in_child, [(store_url, secret, start)] * 3)
    assert sorted(results) == ["join_token_used"] * 2 + ["won"]
