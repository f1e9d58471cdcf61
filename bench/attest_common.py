"""What the workload-attestation benchmarks share (bench/attest_workload.py,
bench/attest_docker.py): the agent's catalog with the ``unix`` attestor first and the
measured ones after it, the timing loop over ``attest_workload`` in one event loop, the
limit (the ``unix`` attestor alone, on the same caller), the note giving a row's p50
over the limit's, and the section heading of a run on its own.

Nothing here asserts on time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from timing import Result, header, timed_async

from custos.plugin import AgentCatalog, PeerCredentials, PluginConfig

TD = "bench.example"
#: The catalog's node attestor: a workload attestation never calls it.
NODE = (PluginConfig("join_token", {"token": "unused"}),)
#: The label of the limit row: the ``unix`` attestor alone.
LIMIT = "limit: unix attestor alone"


def timed(label: str, call: Callable[[], Awaitable[object]], n: int, warmup: int = 50) -> Result:
    """``call`` awaited ``warmup`` times, then ``n`` times timed, in one event loop."""

    return Result(label, asyncio.run(timed_async(call, n, warmup)))


def catalog(*extra: PluginConfig) -> AgentCatalog:
    """The agent's catalog: the ``unix`` workload attestor, then ``extra``."""
    return AgentCatalog.load(
        TD, node_attestors=NODE, workload_attestors=[PluginConfig("unix"), *extra]
    )


def unix_limit(peer: PeerCredentials, n: int, label: str = LIMIT) -> Result:
    """The limit: ``peer`` attested by the ``unix`` attestor alone, ``n`` times."""
    with catalog() as unix_only:
        return timed(label, lambda: unix_only.attest_workload(peer), n)


def over(r: Result, limit: Result, aim: str = "") -> str:
    """The note of a row: its p50 over the limit's (and the aim, if given)."""
    return f"+{(r.p50 - limit.p50) * 1e3:.3f} ms p50" + (f" ({aim})" if aim else "")


def print_section(title: str) -> None:
    """A section heading and the table's header (a benchmark run on its own)."""
    print(f"\n### {title}\n")
    print(header())


__all__ = ["LIMIT", "NODE", "TD", "catalog", "over", "print_section", "timed", "unix_limit"]
