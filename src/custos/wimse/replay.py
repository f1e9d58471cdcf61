"""Replay caches: remember proof identifiers (WPT ``jti``, signature ``nonce``)
until the proof would have expired anyway.

``MemoryReplayCache`` is bounded and per process; ``RedisReplayCache`` shares
the memory among relying-party replicas (SET NX with an expiry: one round trip,
atomic).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class ReplayCache(Protocol):
    def check_and_store(self, namespace: str, value: str, expires_at: float) -> bool:
        """Record ``value`` under ``namespace`` until ``expires_at`` (epoch seconds).

        Returns True when it was new, False when it had been seen (a replay).
        """
        ...
