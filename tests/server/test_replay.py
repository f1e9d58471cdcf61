"""The datastore replay cache: one proof refused across several servers."""

from __future__ import annotations

import math
import threading

import pytest

from custos._numbers import InvalidNumberError
from custos.server.datastore import Datastore
from custos.wimse.replay import ReplayCache

from .conftest import TRUST_DOMAIN


def test_is_a_replay_cache(store: Datastore) -> None:
    assert isinstance(store.replay, ReplayCache)


def test_second_server_refuses_a_replay(store: Datastore, store_url: str) -> None:
    with Datastore.open(store_url, trust_domain=TRUST_DOMAIN) as other:
        assert store.replay.check_and_store("wpt:a", "jti-1", 2000.0, now=1000.0)
        assert not other.replay.check_and_store("wpt:a", "jti-1", 2000.0, now=1001.0)
        assert other.replay.check_and_store("wpt:b", "jti-1", 2000.0, now=1001.0)


def test_expired_rows_are_pruned_and_reusable(store: Datastore) -> None:
    assert store.replay.check_and_store("ns", "v", 1010.0, now=1000.0)
    assert not store.replay.check_and_store("ns", "v", 1010.0, now=1009.0)
    assert store.replay.check_and_store("ns", "v", 1030.0, now=1010.0)


def test_prune_removes_only_expired_rows(store: Datastore) -> None:
    assert store.replay.check_and_store("ns", "old", 1010.0, now=1000.0)
    assert store.replay.check_and_store("ns", "live", 5000.0, now=1000.0)
    assert store.replay.prune(now=2000.0) == 1
    assert not store.replay.check_and_store("ns", "live", 5000.0, now=2001.0)
    assert store.replay.check_and_store("ns", "old", 5000.0, now=2001.0)


@pytest.mark.parametrize(("expires", "now"), [(math.nan, 1.0), (math.inf, 1.0), (5.0, math.nan)])
def test_non_finite_times_refused(store: Datastore, expires: float, now: float) -> None:
    with pytest.raises(InvalidNumberError):
        store.replay.check_and_store("ns", "v", expires, now=now)


def test_concurrent_stores_one_new(store: Datastore) -> None:
    barrier = threading.Barrier(6)
    results: list[bool] = []

    def check() -> None:
        barrier.wait()
        results.append(store.replay.check_and_store("ns", "same", 9e9))

    threads = [threading.Thread(target=check) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 5 + [True]
