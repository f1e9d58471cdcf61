"""The Workload API's limits: per-uid request rate, per-uid streams, message size.

A caller is a uid (the issue: "a caller is a uid"): every process of one user
shares one budget, so a user cannot get more by opening more connections or
forking. Defaults are generous for one node (a busy sidecar signs a WPT per
outgoing request) and small against a runaway loop:

- ``requests_per_second`` 200, ``burst`` 400: a token bucket per uid; every
  call (a stream's start included) takes one token;
- ``max_streams_per_uid`` 64: concurrent streaming calls (FetchX509SVID & co.);
- ``max_message_bytes`` 4 MiB: one request message (gRPC's own default);
- ``attestation_cache_seconds`` 1.0: how long one connection's attestation is
  reused by the next call on the same connection (a new connection re-attests);
- ``max_connections_per_uid`` 256: connections one uid holds open at once (each
  costs the agent a socket and a pidfd); one more is closed as soon as it is accepted.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from custos._numbers import InvalidNumberError, finite_number, seconds
from custos.errors import CustosError


class WorkloadApiConfigError(CustosError, ValueError):
    code = "workload_api_config"


#: Buckets idle this long are dropped (a full bucket is the same as no bucket).
_IDLE_SECONDS = 60.0
#: uids tracked at most; beyond that the idle ones are swept first.
_MAX_TRACKED = 4096


@dataclass(frozen=True)
class WorkloadApiLimits:
    requests_per_second: float = 200.0
    burst: int = 400
    max_streams_per_uid: int = 64
    max_message_bytes: int = 4 * 1024 * 1024
    attestation_cache_seconds: float = 1.0
    max_connections_per_uid: int = 256

    def __post_init__(self) -> None:
        try:
            finite_number(self.requests_per_second, name="requests_per_second", minimum=0.001,
                          maximum=1e6)
            for name in ("burst", "max_streams_per_uid", "max_message_bytes",
                         "max_connections_per_uid"):
                value = getattr(self, name)
                if not isinstance(value, int) or isinstance(value, bool):
                    raise WorkloadApiConfigError(f"{name} must be a whole number")
            finite_number(self.burst, name="burst", minimum=1, maximum=1_000_000)
            finite_number(self.max_streams_per_uid, name="max_streams_per_uid", minimum=1,
                          maximum=100_000)
            finite_number(self.max_message_bytes, name="max_message_bytes", minimum=1024,
                          maximum=64 * 1024 * 1024)
            seconds(self.attestation_cache_seconds, name="attestation_cache_seconds",
                    minimum=0.0, maximum=60.0)
            # At most 65,536: each connection holds two file descriptors (socket, pidfd).
            finite_number(self.max_connections_per_uid, name="max_connections_per_uid",
                          minimum=1, maximum=65_536)
        except InvalidNumberError as e:
            raise WorkloadApiConfigError(f"workload API limits: {e.message}") from e

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any]) -> WorkloadApiLimits:
        """From a config table (e.g. agent.toml's ``[workload_api]``); an unknown
        key is one clear error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(table) - known)
        if unknown:
            listed = ", ".join(sorted(known))
            raise WorkloadApiConfigError(
                f"workload API limits: unknown key {unknown[0]!r} (known: {listed})"
            )
        return cls(**dict(table))


class RateLimiter:
    """A token bucket per uid (single event loop: no lock needed)."""

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._buckets: dict[int, tuple[float, float]] = {}  # uid -> (tokens, last)
        #: uids refused since their last allowed call: a caller hammering an empty
        #: bucket is logged once per episode, not once per call.
        self._refused: set[int] = set()

    def first_refusal(self, uid: int) -> bool:
        """True the first time ``uid`` is refused since it was last allowed."""
        if uid in self._refused:
            return False
        self._refused.add(uid)
        return True

    def allow(self, uid: int) -> bool:
        now = time.monotonic()
        tokens, last = self._buckets.get(uid, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
            self._refused.discard(uid)
        if uid not in self._buckets and len(self._buckets) >= _MAX_TRACKED:
            self._sweep(now)
        self._buckets[uid] = (tokens, now)
        return allowed

    def _sweep(self, now: float) -> None:
        for uid, (_, last) in list(self._buckets.items()):
            if now - last > _IDLE_SECONDS:
                del self._buckets[uid]
                self._refused.discard(uid)


class StreamCounter:
    """Concurrent streaming calls per uid."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._open: dict[int, int] = {}

    def acquire(self, uid: int) -> bool:
        count = self._open.get(uid, 0)
        if count >= self._limit:
            return False
        self._open[uid] = count + 1
        return True

    def release(self, uid: int) -> None:
        count = self._open.get(uid, 1) - 1
        if count <= 0:
            self._open.pop(uid, None)
        else:
            self._open[uid] = count


__all__ = ["RateLimiter", "StreamCounter", "WorkloadApiConfigError", "WorkloadApiLimits"]
