"""Small timing helpers for `make bench`: per-call latencies, throughput, percentiles.

Benchmarks print figures and ratios; they never assert on time (that belongs nowhere
near the test suite).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Result:
    label: str
    latencies: list[float]  # seconds per call

    @property
    def n(self) -> int:
        return len(self.latencies)

    @property
    def per_second(self) -> float:
        return self.n / sum(self.latencies)

    def pct(self, p: float) -> float:
        data = sorted(self.latencies)
        idx = min(len(data) - 1, max(0, round(p / 100 * (len(data) - 1))))
        return data[idx]

    @property
    def p50(self) -> float:
        return self.pct(50)

    @property
    def p99(self) -> float:
        return self.pct(99)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.latencies)


def measure(label: str, fn: Callable[[], object], n: int, warmup: int = 20) -> Result:
    for _ in range(warmup):
        fn()
    out = []
    clock = time.perf_counter
    for _ in range(n):
        t0 = clock()
        fn()
        out.append(clock() - t0)
    return Result(label, out)


async def timed_async(
    call: Callable[[], Awaitable[object]], n: int, warmup: int = 20
) -> list[float]:
    """Seconds per ``await call()``: ``warmup`` calls untimed, then ``n`` timed, in the
    running event loop (the one loop every async row uses)."""
    for _ in range(warmup):
        await call()
    out = []
    clock = time.perf_counter
    for _ in range(n):
        t0 = clock()
        await call()
        out.append(clock() - t0)
    return out


def header() -> str:
    return f"{'what':<52} {'ops/s':>10} {'p50 µs':>9} {'p99 µs':>9} {'ratio':>8}"


def row(r: Result, baseline: Result | None = None, *, note: str = "") -> str:
    ratio = f"{r.p50 / baseline.p50:7.2f}x" if baseline is not None else "       -"
    return (
        f"{r.label:<52} {r.per_second:>10.0f} {r.p50 * 1e6:>9.1f} {r.p99 * 1e6:>9.1f} {ratio:>8}"
        + (f"  {note}" if note else "")
    )
