"""Replay caches: the memory cache (bounded, thread-safe, fail-closed) and the
Redis cache against a real redis-server."""

from __future__ import annotations

import threading
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from custos.integrations.problem import http_status
from custos.wimse.errors import WimseError
from custos.wimse.replay import (
    MemoryReplayCache,
    RedisReplayCache,
    ReplayCache,
    ReplayCacheFullError,
    ReplayCacheUnavailableError,
)


class FakeClock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# -- memory --------------------------------------------------------------------------


def test_memory_cache_is_a_replay_cache() -> None:
    assert isinstance(MemoryReplayCache(), ReplayCache)


def test_memory_first_seen_then_replay() -> None:
    clock = FakeClock()
    cache = MemoryReplayCache(clock=clock)
    assert cache.check_and_store("wimse://example.com/a", "n1", clock.t + 60) is True
    assert cache.check_and_store("wimse://example.com/a", "n1", clock.t + 60) is False
    # Same nonce from another sender is a different entry.
    assert cache.check_and_store("wimse://example.com/b", "n1", clock.t + 60) is True


def test_memory_namespace_and_value_do_not_run_together() -> None:
    clock = FakeClock()
    cache = MemoryReplayCache(clock=clock)
    assert cache.check_and_store("a", "b:c", clock.t + 60)
    assert cache.check_and_store("a:b", "c", clock.t + 60)


def test_memory_entry_expires() -> None:
    clock = FakeClock()
    cache = MemoryReplayCache(clock=clock)
    assert cache.check_and_store("ns", "n", clock.t + 10)
    clock.t += 9
    assert cache.check_and_store("ns", "n", clock.t + 10) is False
    clock.t += 2  # past the first expiry
    assert cache.check_and_store("ns", "n", clock.t + 10) is True
    assert len(cache) == 1


def test_memory_full_of_live_entries_fails_closed() -> None:
    clock = FakeClock()
    cache = MemoryReplayCache(max_entries=3, clock=clock)
    for i in range(3):
        assert cache.check_and_store("ns", f"n{i}", clock.t + 60)
    with pytest.raises(ReplayCacheFullError) as err:
        cache.check_and_store("ns", "n3", clock.t + 60)
    assert err.value.code == "replay_cache_full"
    assert http_status(err.value) == 503
    assert isinstance(err.value, WimseError)
    # The live entries were not evicted: they still count as replays.
    for i in range(3):
        assert cache.check_and_store("ns", f"n{i}", clock.t + 60) is False


def test_memory_full_cache_evicts_expired_entries_first() -> None:
    clock = FakeClock()
    cache = MemoryReplayCache(max_entries=3, clock=clock)
    cache.check_and_store("ns", "short", clock.t + 5)
    cache.check_and_store("ns", "long1", clock.t + 100)
    cache.check_and_store("ns", "long2", clock.t + 100)
    clock.t += 6
    assert cache.check_and_store("ns", "new", clock.t + 100) is True
    assert len(cache) == 3
    assert cache.check_and_store("ns", "long1", clock.t + 100) is False


def test_memory_restoring_a_key_keeps_heap_bounded() -> None:
    clock = FakeClock()
    cache = MemoryReplayCache(max_entries=2, clock=clock)
    for _ in range(20):
        assert cache.check_and_store("ns", "same", clock.t + 1)
        clock.t += 2
    assert len(cache._heap) <= 4
    assert len(cache) == 0


def test_memory_huge_values_are_hashed() -> None:
    clock = FakeClock()
    cache = MemoryReplayCache(clock=clock)
    big = "x" * 1_000_000
    assert cache.check_and_store("ns", big, clock.t + 60)
    assert cache.check_and_store("ns", big, clock.t + 60) is False
    assert all(len(k) == 32 for k in cache._expiry)


def test_memory_concurrent_checks_admit_exactly_one() -> None:
    cache = MemoryReplayCache()
    results: list[bool] = []
    lock = threading.Lock()
    barrier = threading.Barrier(16)

    def worker() -> None:
        barrier.wait()
        r = cache.check_and_store("ns", "contended", time.time() + 60)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 15 + [True]


def test_memory_rejects_nonsense_size() -> None:
    with pytest.raises(ValueError):
        MemoryReplayCache(max_entries=0)


# -- redis ---------------------------------------------------------------------------------


def test_redis_set_nx_semantics(redis_server) -> None:  # type: ignore[no-untyped-def]
    cache = RedisReplayCache(redis_server.client())
    assert isinstance(cache, ReplayCache)
    exp = time.time() + 60
    assert cache.check_and_store("wimse://example.com/a", "n1", exp) is True
    assert cache.check_and_store("wimse://example.com/a", "n1", exp) is False
    assert cache.check_and_store("wimse://example.com/b", "n1", exp) is True


def test_redis_key_is_hashed_and_carries_expiry(redis_server) -> None:  # type: ignore[no-untyped-def]
    client = redis_server.client()
    cache = RedisReplayCache(client, prefix="t:")
    huge = "n" * 100_000
    assert cache.check_and_store("ns", huge, time.time() + 30)
    keys = client.keys("t:*")
    assert len(keys) == 1
    assert len(keys[0]) == len("t:") + 64  # prefix + hex SHA-256, whatever the nonce size
    ttl = client.pttl(keys[0])
    assert 0 < ttl <= 30_000


def test_redis_entry_expires(redis_server) -> None:  # type: ignore[no-untyped-def]
    clock_now = time.time()
    cache = RedisReplayCache(redis_server.client(), clock=lambda: clock_now)
    # 1 ms left: Redis drops the key by itself.
    assert cache.check_and_store("ns", "short", clock_now + 0.001)
    deadline = time.monotonic() + 5
    while redis_server.client().exists(cache.key_for("ns", "short")):
        assert time.monotonic() < deadline, "redis did not expire the key"
        time.sleep(0.01)
    assert cache.check_and_store("ns", "short", clock_now + 60) is True


def test_redis_already_expired_proof_still_stored_briefly(redis_server) -> None:  # type: ignore[no-untyped-def]
    cache = RedisReplayCache(redis_server.client())
    # An expires_at in the past must not turn into an invalid PX (<= 0) error.
    assert cache.check_and_store("ns", "old", time.time() - 100) is True


def test_two_replicas_share_entries(redis_server) -> None:  # type: ignore[no-untyped-def]
    replica_a = RedisReplayCache(redis_server.client())
    replica_b = RedisReplayCache(redis_server.client())
    exp = time.time() + 60
    assert replica_a.check_and_store("wimse://example.com/a", "nonce-1", exp) is True
    assert replica_b.check_and_store("wimse://example.com/a", "nonce-1", exp) is False
    assert replica_b.check_and_store("wimse://example.com/a", "nonce-2", exp) is True
    assert replica_a.check_and_store("wimse://example.com/a", "nonce-2", exp) is False


def test_prefixes_separate_deployments(redis_server) -> None:  # type: ignore[no-untyped-def]
    a = RedisReplayCache(redis_server.client(), prefix="svc-a:")
    b = RedisReplayCache(redis_server.client(), prefix="svc-b:")
    exp = time.time() + 60
    assert a.check_and_store("ns", "n", exp)
    assert b.check_and_store("ns", "n", exp)


def test_redis_concurrent_replicas_admit_exactly_one(redis_server) -> None:  # type: ignore[no-untyped-def]
    caches = [RedisReplayCache(redis_server.client()) for _ in range(8)]
    results: list[bool] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(caches))

    def worker(cache: RedisReplayCache) -> None:
        barrier.wait()
        r = cache.check_and_store("ns", "contended", time.time() + 60)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=worker, args=(c,)) for c in caches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]


def test_dead_redis_fails_closed(redis_server_factory) -> None:  # type: ignore[no-untyped-def]
    server = redis_server_factory()
    # No client-side retries: redis-py's default backoff would only slow the test.
    cache = RedisReplayCache(server.client(retry=Retry(NoBackoff(), 0)))
    assert cache.check_and_store("ns", "before", time.time() + 60) is True
    server.stop()
    with pytest.raises(ReplayCacheUnavailableError) as err:
        cache.check_and_store("ns", "after", time.time() + 60)
    assert err.value.code == "replay_cache_unavailable"
    assert http_status(err.value) == 503
    assert isinstance(err.value.__cause__, redis.RedisError)
    # Nor does a replay of an entry stored before the outage slip through.
    with pytest.raises(ReplayCacheUnavailableError):
        cache.check_and_store("ns", "before", time.time() + 60)


# -- the caller's clock ---------------------------------------------------------------------


def test_memory_judges_expiry_by_the_now_it_is_given() -> None:
    """A verifier with a pinned past clock hands that clock in: the entry it
    stores is live at that time even though the cache's own clock is later."""
    cache = MemoryReplayCache(clock=FakeClock(2_000_000.0))
    pinned = 1_000_000.0
    assert cache.check_and_store("ns", "n", pinned + 60, now=pinned) is True
    assert cache.check_and_store("ns", "n", pinned + 60, now=pinned + 30) is False
    # without it, the cache's clock says the entry is long gone
    assert cache.check_and_store("ns", "n", pinned + 60) is True


def test_memory_full_cache_purges_by_the_given_now() -> None:
    cache = MemoryReplayCache(max_entries=1, clock=FakeClock(0.0))
    assert cache.check_and_store("ns", "a", 100.0, now=50.0)
    with pytest.raises(ReplayCacheFullError):
        cache.check_and_store("ns", "b", 200.0, now=99.0)
    assert cache.check_and_store("ns", "b", 200.0, now=101.0)


def test_redis_ttl_is_counted_from_the_given_now(redis_server) -> None:  # type: ignore[no-untyped-def]
    client = redis_server.client()
    cache = RedisReplayCache(client, prefix="p:")
    pinned = 1_000_000.0  # long past on the real clock
    assert cache.check_and_store("ns", "n", pinned + 30, now=pinned) is True
    assert cache.check_and_store("ns", "n", pinned + 30, now=pinned) is False
    ttl = client.pttl(cache.key_for("ns", "n"))
    assert 25_000 < ttl <= 30_000


def test_no_call_signature_sniffing_is_left() -> None:
    """Caches written before ``now=`` existed are not supported (nothing was
    released with that signature): the protocol has one signature, and no
    helper inspects a cache's method to guess which one it has."""
    import custos.wimse.replay as replay_module

    assert not hasattr(replay_module, "takes_now")
    assert not hasattr(replay_module, "check_pinned_clock")
    assert "inspect" not in vars(replay_module)


@pytest.mark.parametrize("size", [0, -1, 1.5, float("nan"), float("inf"), True, "100", 10**12])
def test_memory_cache_size_is_a_bounded_whole_number(size: object) -> None:
    from custos._numbers import InvalidNumberError

    with pytest.raises(InvalidNumberError):
        MemoryReplayCache(max_entries=size)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("expires_at", "now"),
    [
        (float("nan"), None),
        (float("inf"), None),
        (1_000_060.0, float("nan")),
        (1_000_060.0, float("-inf")),
        (float("nan"), 1_000_000.0),
    ],
)
def test_memory_cache_refuses_non_finite_times(expires_at: float, now: float | None) -> None:
    """A NaN expiry compares false with every clock: stored, it would never be
    'live', and every replay of it would pass."""
    from custos._numbers import InvalidNumberError

    cache = MemoryReplayCache(clock=FakeClock())
    with pytest.raises(InvalidNumberError):
        cache.check_and_store("ns", "n", expires_at, now=now)
    assert len(cache) == 0


def test_redis_cache_refuses_non_finite_times_before_any_round_trip() -> None:
    from custos._numbers import InvalidNumberError

    # No server at all: a refusal here cannot come from Redis.
    cache = RedisReplayCache(redis.Redis(port=1), clock=FakeClock())
    for expires_at, now in [(float("nan"), None), (1e6, float("inf")), (float("inf"), 1e6)]:
        with pytest.raises(InvalidNumberError):
            cache.check_and_store("ns", "n", expires_at, now=now)


@pytest.mark.parametrize("prefix", ["", 1, None, "a\x00"])
def test_redis_prefix_must_be_a_printable_string(prefix: object) -> None:
    with pytest.raises(ValueError):
        RedisReplayCache(redis.Redis(), prefix=prefix)  # type: ignore[arg-type]


def test_replay_namespaces_of_the_two_variants_never_meet() -> None:
    from custos.wimse.replay import replay_namespace

    subject = "spiffe://example.org/w"
    assert replay_namespace("wpt", subject) != replay_namespace("http-sig", subject)
    assert replay_namespace("wpt", subject) == "wpt:" + subject
    with pytest.raises(ValueError):
        replay_namespace("other", subject)
