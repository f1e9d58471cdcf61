"""Server benchmarks (issue 8, "Speed"): entries fetch, and entry change → connected agent.

Entries fetch: an agent that owns 1,000 of the datastore's 10,000 entries opens
``SyncEntries`` on a real ``custos server run`` process (TLS, WIT + WPT, entitlement,
proto encoding) and the time to the first message is measured. The limit is the
entitlement walk alone, in-process, on the same datastore file
(:func:`custos.server.entitlement.entries_for_agent`): the query no server can skip.
Alternating rounds, ratio = p50(server) / p50(limit).

Entry change → agent: the agent keeps ``SyncEntries`` open; an entry for it is created
through the admin API (Unix socket) and the time from just before ``CreateEntry`` to the
stream message that carries the new entry is measured, on SQLite with one server, and on
PostgreSQL with the entry created through server A while the agent streams from server B
(LISTEN/NOTIFY between them). There is no in-process limit for a push: the figure is
reported against the issue's aim, p99 < 1 s.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from server_common import TRUST_DOMAIN

from custos.identity import SpiffeId, TrustDomain
from custos.server.datastore import Datastore
from custos.server.datastore.records import Agent

if TYPE_CHECKING:
    from custos.testing.server import ServerRig

#: The issue's shape: one agent owns 1,000 of 10,000 entries.
TOTAL_ENTRIES = 10_000
OWNED_ENTRIES = 1_000


def populate(ds: Datastore, owner: SpiffeId, *, total: int, owned: int) -> None:
    """``owned`` entries for ``owner`` and the rest spread over other agents, ``owned``
    each: what a trust domain of ``total / owned`` similar nodes looks like.

    Through the datastore's own ``create`` (validation, change feed): a bulk insert
    around it would measure a datastore no server writes.
    """
    td = ds.trust_domain
    for i in range(total):
        agent = i // owned
        parent = owner if agent == 0 else SpiffeId(td, f"/custos/agent/join_token/other{agent}")
        ds.entries.create(
            SpiffeId(td, f"/node{agent}/workload/{i}"),
            parent,
            [f"unix:uid:{1000 + i % owned}"],
            key_custody="memory",
        )


def limit_fetch(ds: Datastore, agent: Agent) -> Callable[[], int]:
    """One call = the entitlement walk for ``agent`` in-process: the entries it may get."""
    from custos.server.context import server_id
    from custos.server.entitlement import entries_for_agent

    sid = server_id(ds.trust_domain)

    def run() -> int:
        return len(entries_for_agent(ds, agent, sid))

    return run


def _fetch_rounds(rounds: int, total: int, owned: int) -> tuple[list[float], list[float]]:
    """Alternating rounds: the first ``SyncEntries`` message for the agent that owns
    ``owned`` of ``total`` entries, then the entitlement walk in-process."""
    import asyncio

    from server_common import attested_agent, server_processes

    from custos.agent.client.streams import sync_entries

    secret = ""
    owner = SpiffeId(TrustDomain.parse(TRUST_DOMAIN), "/custos/agent/join_token/none")

    def prepare(url: str) -> None:
        nonlocal secret, owner
        with Datastore.open(url, trust_domain=TrustDomain.parse(TRUST_DOMAIN)) as ds:
            token, secret = ds.join_tokens.create(600)
            # The join_token attestor names the agent after the token's id.
            owner = SpiffeId(ds.trust_domain, f"/custos/agent/join_token/{token.id}")
            populate(ds, owner, total=total, owned=owned)

    async def drive(rig: ServerRig) -> tuple[list[float], list[float]]:
        server_out: list[float] = []
        limit_out: list[float] = []
        clock = time.perf_counter
        with Datastore.open(rig.url, trust_domain=TrustDomain.parse(TRUST_DOMAIN)) as ds:
            async with attested_agent(rig, secret) as client:
                limit = limit_fetch(ds, ds.agents.get(owner))
                for i in range(rounds + 2):  # 2 warm-up rounds
                    t0 = clock()
                    stream = sync_entries(client)
                    first = await anext(stream)
                    t1 = clock()
                    await stream.aclose()
                    t2 = clock()
                    walked = limit()
                    t3 = clock()
                    assert len(first.entries) == walked == owned, (len(first.entries), walked)
                    if i >= 2:
                        server_out.append(t1 - t0)
                        limit_out.append(t3 - t2)
        return server_out, limit_out

    with server_processes(prepare=prepare) as [(rig, _)]:
        return asyncio.run(drive(rig))


async def change_latencies(admin_rig: ServerRig, agent_rig: ServerRig, changes: int) -> list[float]:
    """Seconds from just before ``CreateEntry`` on ``admin_rig``'s admin socket to the
    ``SyncEntries`` message from ``agent_rig`` that carries the new entry."""
    import asyncio

    from server_common import attested_agent, entry

    from custos.agent.client.streams import sync_entries
    from custos.server.admin.client import AdminClient

    clock = time.perf_counter
    async with AdminClient(admin_rig.admin_socket) as admin:
        token = await admin.generate_token()
        async with attested_agent(agent_rig, token.token) as client:
            seen: asyncio.Queue[tuple[float, frozenset[str]]] = asyncio.Queue()

            async def read() -> None:
                async for update in sync_entries(client):
                    seen.put_nowait((clock(), frozenset(e.id for e in update.entries)))

            reader = asyncio.create_task(read())
            try:
                await asyncio.wait_for(seen.get(), 30)  # the set as it is now
                out: list[float] = []
                for i in range(changes + 3):  # 3 warm-up changes
                    t0 = clock()
                    created = await admin.create_entry(
                        entry(
                            f"spiffe://{admin_rig.trust_domain}/pushed/{i}",
                            token.agent_id,
                            f"unix:uid:{2000 + i}",
                        )
                    )
                    while True:  # a hang guard, not a timing check
                        at, ids = await asyncio.wait_for(seen.get(), 30)
                        if created.id in ids:
                            break
                    if i >= 3:
                        out.append(at - t0)
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader
    return out


def _sqlite_changes(changes: int) -> list[float]:
    import asyncio

    from server_common import server_processes

    with server_processes() as [(rig, _)]:
        return asyncio.run(change_latencies(rig, rig, changes))


def _postgres_changes(changes: int) -> list[float]:
    """Entry created through server A, agent streaming from server B, one PostgreSQL."""
    import asyncio

    from server_common import server_processes

    from custos.testing.postgres import start_postgres

    pg = start_postgres()
    try:
        url = pg.create_database("bench")
        with server_processes(2, datastore_url=url) as [(a, _), (b, _)]:
            return asyncio.run(change_latencies(a, b, changes))
    finally:
        pg.destroy()


def bench_entries_rows(section: Callable[[str], None]) -> None:
    """``make bench`` rows: entries fetch vs the walk; entry change → agent, p50 / p99."""
    from server_common import env_int
    from timing import Result, row

    total = env_int("BENCH_SERVER_ENTRIES", TOTAL_ENTRIES)
    owned = min(OWNED_ENTRIES, total)
    server, limit = _fetch_rounds(env_int("BENCH_SERVER_FETCHES", 20), total, owned)
    section(
        f"Server: entries fetch, agent owning {owned:,} of {total:,} entries "
        "(ratio = p50 / in-process entitlement walk)"
    )
    lim = Result(f"in-process entitlement walk ({owned:,} entries, SQLite)", limit)
    print(row(lim))
    print(row(Result("Agent API SyncEntries, first message (SQLite)", server), lim))

    changes = env_int("BENCH_SERVER_CHANGES", 50)
    section("Server: entry change -> connected agent (aim p99 < 1 s; no in-process limit)")
    for label, run in (
        ("admin CreateEntry -> SyncEntries, one server, SQLite", _sqlite_changes),
        ("CreateEntry on A -> SyncEntries from B, PostgreSQL", _postgres_changes),
    ):
        r = Result(label, run(changes))
        print(row(r, note=f"p50 {r.p50 * 1e3:.1f} ms, p99 {r.p99 * 1e3:.1f} ms"))
