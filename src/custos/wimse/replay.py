"""Replay caches: remember proof identifiers (WPT ``jti``, signature ``nonce``)
until the proof would have expired anyway.

``MemoryReplayCache`` is bounded and per process; ``RedisReplayCache`` shares
the memory among relying-party replicas (SET NX with an expiry: one round trip,
atomic).

Both store a SHA-256 of ``namespace`` and ``value`` rather than the values
themselves: nonces and ``jti`` are chosen by the caller, and hashing bounds
every entry (memory, Redis key size) whatever the caller sends.

Both fail closed: when the cache cannot answer (Redis down, memory cache full
of live entries) they raise :class:`ReplayCacheUnavailableError` instead of
guessing "new", because a cache that says "new" when it does not know turns
replay protection off exactly when an attacker floods it.

Whose clock: ``check_and_store`` takes ``now``. A verifier with a pinned clock
(tests, the CLI's ``--now``) passes its own time, so an entry is judged live or
expired by the same clock that judged the proof; otherwise a cache on the real
clock would take every entry stored under a pinned past "now" as long expired
and never see a replay. ``now=None`` means the cache's own clock. Every cache
takes ``now=`` (the protocol has one signature; none was ever released
without it).

Times and sizes are checked (:mod:`custos._numbers`): a NaN ``expires_at``
compares false with every clock, so an entry stored with it would never be
live and every replay of it would pass; such a call is refused.

Namespaces: verifiers store ``replay_namespace(variant, subject)``, so a WPT
``jti`` and an HTTP-signature ``nonce`` of the same value from the same sender
are two entries, never one proof using up the other.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from custos._numbers import InvalidNumberError, finite_number
from custos.wimse.errors import WimseError

if TYPE_CHECKING:
    import redis


@runtime_checkable
class ReplayCache(Protocol):
    def check_and_store(
        self, namespace: str, value: str, expires_at: float, *, now: float | None = None
    ) -> bool:
        """Record ``value`` under ``namespace`` until ``expires_at`` (epoch seconds).

        Returns True when it was new, False when it had been seen (a replay).
        ``now`` is the caller's time (a verifier's pinned clock); None means
        the cache's own clock.
        """
        ...


#: The replay-namespace prefix of each proof variant.
_VARIANT_PREFIXES = {"wpt": "wpt:", "http-sig": "http-sig:"}


def replay_namespace(variant: str, subject: str) -> str:
    """The namespace a verifier stores its proof identifiers under.

    Per sender (wpt-02 and httpsig-06 scope replay "within a sender"), and per
    variant: ``wpt:<subject>`` for WPT ``jti`` values, ``http-sig:<subject>``
    for signature ``nonce`` values. Neither prefix is a prefix of the other, so
    the two variants' entries can never collide.
    """
    prefix = _VARIANT_PREFIXES.get(variant)
    if prefix is None:
        raise ValueError(f"unknown replay variant {variant!r}")
    return prefix + subject


def check_and_store(
    cache: ReplayCache, namespace: str, value: str, expires_at: float, now: float | None
) -> bool:
    """``cache.check_and_store`` with ``now`` passed on (None: the cache's clock).

    The one call every verifier makes, so the keyword is spelled in one place.
    """
    return cache.check_and_store(namespace, value, expires_at, now=now)


#: The largest memory cache: beyond this a per-process dict is the wrong tool
#: (use Redis), and a typo of a few zeros should not reserve gigabytes.
MAX_MEMORY_ENTRIES = 100_000_000


def check_finite_times(expires_at: float, now: float | None) -> None:
    """Refuse NaN / infinite times (math.isfinite: this runs per request)."""
    if not math.isfinite(expires_at) or (now is not None and not math.isfinite(now)):
        raise InvalidNumberError("replay cache times must be finite numbers")


class ReplayCacheUnavailableError(WimseError):
    """The replay cache cannot tell whether a proof is new; the request is refused."""

    code = "replay_cache_unavailable"


class ReplayCacheFullError(ReplayCacheUnavailableError):
    """Every slot of the memory cache holds an entry that has not expired yet."""

    code = "replay_cache_full"


_heappush = heapq.heappush


def entry_key(namespace: str, value: str) -> bytes:
    """The fixed-size key one (namespace, value) pair is stored under, in every cache."""
    # A NUL separator keeps ("a", "b:c") and ("a:b", "c") apart; UTF-8 with
    # surrogatepass so any str a framework hands us hashes instead of raising.
    data = (
        namespace.encode("utf-8", "surrogatepass")
        + b"\x00"
        + value.encode("utf-8", "surrogatepass")
    )
    return hashlib.sha256(data).digest()


class MemoryReplayCache:
    """A bounded, thread-safe, per-process replay cache.

    When the cache is full it first drops expired entries. If every entry is
    still live it refuses (:class:`ReplayCacheFullError`, fail closed) rather
    than evicting the oldest live entry: evicting would let whoever filled the
    cache replay the entry it pushed out. Entries live only as long as a proof
    does (minutes), so a full cache drains by itself; size ``max_entries`` for
    the peak request rate times the proof lifetime.

    ``clock`` returns epoch seconds; tests pass their own.
    """

    def __init__(
        self, max_entries: int = 100_000, *, clock: Callable[[], float] = time.time
    ) -> None:
        if not isinstance(max_entries, int):
            # 1.5 or "100" would pass a float range check; a size is a whole number.
            raise InvalidNumberError(
                f"max_entries must be a whole number, not {type(max_entries).__name__}"
            )
        finite_number(max_entries, name="max_entries", minimum=1, maximum=MAX_MEMORY_ENTRIES)
        self.max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._expiry: dict[bytes, float] = {}
        # (expires_at, key); may hold stale pairs for keys stored again later,
        # which _purge recognises by comparing with _expiry.
        self._heap: list[tuple[float, bytes]] = []

    def __len__(self) -> int:
        with self._lock:
            self._purge(self._clock())
            return len(self._expiry)

    def check_and_store(
        self, namespace: str, value: str, expires_at: float, *, now: float | None = None
    ) -> bool:
        check_finite_times(expires_at, now)
        key = entry_key(namespace, value)
        expiry = self._expiry
        with self._lock:
            known = expiry.get(key)
            if known is not None:
                # The clock is read only when its answer is needed: a known
                # key (live or not) or a full cache.  A new key in a cache
                # with room is stored whatever the time.
                if now is None:
                    now = self._clock()
                if known > now:
                    return False
            elif len(expiry) >= self.max_entries:
                if now is None:
                    now = self._clock()
                self._purge(now)
                if len(expiry) >= self.max_entries:
                    raise ReplayCacheFullError(
                        f"replay cache holds {self.max_entries} live entries; refusing"
                    )
            expiry[key] = expires_at
            _heappush(self._heap, (expires_at, key))
            if len(self._heap) > 2 * self.max_entries:
                # Stale heap pairs pile up only when keys are re-stored; rebuild.
                self._heap = [(exp, k) for k, exp in self._expiry.items()]
                heapq.heapify(self._heap)
            return True

    def _purge(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            exp, key = heapq.heappop(heap)
            if self._expiry.get(key) == exp:
                del self._expiry[key]


class RedisReplayCache:
    """A replay cache shared by relying-party replicas through Redis.

    One ``SET key 1 NX PX ttl`` per check: atomic on the server, so two
    replicas receiving the same proof at once cannot both see it as new. The
    expiry is sent relative (PX, computed with the local clock) rather than as
    an absolute PXAT, so a Redis server whose clock differs from ours does not
    shorten or stretch the window.
    """

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = "custos:replay:",
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(prefix, str) or not prefix or not prefix.isprintable():
            raise ValueError("prefix must be a non-empty printable string")
        self._client = client
        self._prefix = prefix
        self._clock = clock

    def key_for(self, namespace: str, value: str) -> str:
        return self._prefix + entry_key(namespace, value).hex()

    def check_and_store(
        self, namespace: str, value: str, expires_at: float, *, now: float | None = None
    ) -> bool:
        import redis

        check_finite_times(expires_at, now)
        start = self._clock() if now is None else now
        ttl_ms = max(1, math.ceil((expires_at - start) * 1000))
        try:
            stored = self._client.set(self.key_for(namespace, value), b"1", nx=True, px=ttl_ms)
        except redis.RedisError as e:
            raise ReplayCacheUnavailableError(
                f"replay cache (redis) unavailable: {type(e).__name__}"
            ) from e
        return bool(stored)
