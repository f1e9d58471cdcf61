"""Two ``custos server run`` processes on one PostgreSQL database (issue 8, "Datastore";
decision 0043): what must hold however the servers' work interleaves.

- a join token is consumed once, even by two agents racing on two servers;
- entry updates through both servers lose nothing: a stale revision is ABORTED
  (``revision_conflict``) and a retry with the stored revision succeeds;
- an Agent API proof (WIT + WPT) accepted by one server is refused by the other
  (the replay cache is the shared datastore);
- an entry created through A reaches an agent streaming from B (LISTEN/NOTIFY: the
  servers' safety poll is set to an hour, so it cannot be what delivers it).

The servers are real subprocesses (:class:`custos.testing.server.ServerProcess`), one
pair for the module. Every wait is bounded so a hang fails; nothing asserts on time.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from grpclib.const import Status

from custos._proto import agent_v1_grpc, agent_v1_pb2, types_v1_pb2
from custos.agent.client.errors import AgentApiError, run_call
from custos.agent.client.streams import bundle_from_proto, sync_entries
from custos.identity import TrustDomain
from custos.server.admin.client import AdminApiError, AdminClient
from custos.testing.postgres import PostgresServer
from custos.testing.server import RigAgent, ServerProcess, ServerRig, join_token_agent

TD = "example.org"
BOUND = 30.0
T = TypeVar("T")
SVIDS = "custos.agent.v1.Svids"


async def bounded(aw: Awaitable[T]) -> T:
    return await asyncio.wait_for(aw, BOUND)


@dataclass
class Pair:
    a: ServerRig
    b: ServerRig
    url: str


@pytest.fixture(scope="module")
def pair(postgres: PostgresServer) -> Iterator[Pair]:
    """Servers A and B on one database, sharing their signing keys (as two servers
    share one HSM token in production), the safety poll off."""
    url = postgres.create_database()
    keys = Path(tempfile.mkdtemp(prefix="custos-keys-"))
    shared = {"store": "exportable", "key_dir": str(keys)}
    sections = {
        "events": {"poll_interval": "1h"},
        **{f"{p}.key_store": shared for p in ("ca", "jwt_svid", "wit")},
    }
    rigs = [ServerRig.create(datastore_url=url, sections=sections) for _ in range(2)]
    processes = [ServerProcess(rig) for rig in rigs]
    try:
        for process in processes:  # A first: it makes the signing keys B then loads
            process.start()
        yield Pair(rigs[0], rigs[1], url)
    finally:
        for process in processes:
            if process.process is not None and process.process.poll() is None:
                process.terminate()
        for rig in rigs:
            rig.destroy()
        shutil.rmtree(keys, ignore_errors=True)
        postgres.drop_database(url.rsplit("/", 1)[1])


async def agent_on(rig: ServerRig, secret: str) -> RigAgent:
    """An agent attested with the join token ``secret`` at ``rig``'s Agent API."""
    async with AdminClient(rig.admin_socket) as admin:
        bundle = bundle_from_proto(await admin.get_bundle(), TrustDomain.parse(TD))
    return await join_token_agent(rig.agent_api_address, bundle, secret, trust_domain=TD)


def entry(spiffe_id: str, parent_id: str, *selectors: str) -> types_v1_pb2.Entry:
    return types_v1_pb2.Entry(
        spiffe_id=spiffe_id,
        parent_id=parent_id,
        selectors=list(selectors) or ["unix:uid:1000"],
        key_custody="memory",
        x509_svid_ttl=3600,
        jwt_svid_ttl=300,
        wit_ttl=300,
    )


# -- join tokens ----------------------------------------------------------------------


def test_a_join_token_is_consumed_once_by_agents_racing_on_two_servers(pair: Pair) -> None:
    async def race() -> None:
        async with AdminClient(pair.a.admin_socket) as admin:
            token = await admin.generate_token()
        results = await asyncio.gather(
            bounded(agent_on(pair.a, token.token)),
            bounded(agent_on(pair.b, token.token)),
            return_exceptions=True,
        )
        won = [r for r in results if isinstance(r, RigAgent)]
        lost = [r for r in results if isinstance(r, AgentApiError)]
        for agent in won:
            await agent.close()
        assert len(won) == 1 and len(lost) == 1, results
        assert (lost[0].status, lost[0].code) == (
            Status.PERMISSION_DENIED,
            "join_token_used",
        )
        assert str(won[0].identity.spiffe_id) == token.agent_id
        # Both servers see the one agent, once.
        for rig in (pair.a, pair.b):
            async with AdminClient(rig.admin_socket) as admin:
                ids = [a.id for a in await admin.list_agents()]
            assert ids.count(token.agent_id) == 1

    for _ in range(3):  # each round is a fresh race between the two servers
        asyncio.run(race())


# -- entries: optimistic concurrency across servers -------------------------------------


def test_a_stale_revision_through_the_other_server_is_aborted_and_a_reread_retry_wins(
    pair: Pair,
) -> None:
    async def main() -> None:
        async with (
            AdminClient(pair.a.admin_socket) as a,
            AdminClient(pair.b.admin_socket) as b,
        ):
            created = await a.create_entry(
                entry(f"spiffe://{TD}/stale", f"spiffe://{TD}/custos/agent/x/stale")
            )
            seen_by_a = await a.get_entry(created.id)
            seen_by_b = await b.get_entry(created.id)
            assert seen_by_a.revision == seen_by_b.revision == 1

            seen_by_a.hint = "from A"
            assert (await a.update_entry(seen_by_a)).revision == 2
            seen_by_b.hint = "from B"
            with pytest.raises(AdminApiError) as info:
                await b.update_entry(seen_by_b)
            assert (info.value.status, info.value.code) == (Status.ABORTED, "revision_conflict")
            # Nothing of B's stale write landed.
            assert (await a.get_entry(created.id)).hint == "from A"

            again = await b.get_entry(created.id)
            assert (again.revision, again.hint) == (2, "from A")
            again.hint = "from B"
            assert (await b.update_entry(again)).revision == 3
            final = await a.get_entry(created.id)
            assert (final.revision, final.hint) == (3, "from B")

    asyncio.run(main())


def test_concurrent_updates_through_both_servers_lose_no_update(pair: Pair) -> None:
    """Eight writers (four per server) each add their own selector to one entry,
    re-reading and retrying on ABORTED: every selector arrives, one revision each."""
    writers = 8

    async def main() -> None:
        async with (
            AdminClient(pair.a.admin_socket) as a,
            AdminClient(pair.b.admin_socket) as b,
        ):
            created = await a.create_entry(
                entry(f"spiffe://{TD}/shared", f"spiffe://{TD}/custos/agent/x/shared")
            )
            conflicts = 0

            async def add(admin: AdminClient, selector: str) -> None:
                nonlocal conflicts
                for _ in range(200):  # a bound, so a livelock fails instead of hanging
                    current = await admin.get_entry(created.id)
                    current.selectors.append(selector)
                    try:
                        await admin.update_entry(current)
                        return
                    except AdminApiError as e:
                        assert (e.status, e.code) == (Status.ABORTED, "revision_conflict")
                        conflicts += 1
                raise AssertionError(f"{selector} never got through")

            await bounded(
                asyncio.gather(*(add(a if i % 2 else b, f"k8s:writer:{i}") for i in range(writers)))
            )
            final = await a.get_entry(created.id)
            assert set(final.selectors) == {
                "unix:uid:1000",
                *(f"k8s:writer:{i}" for i in range(writers)),
            }
            assert final.revision == 1 + writers  # one revision per update, none lost
            assert await b.get_entry(created.id) == final

    asyncio.run(main())


# -- Agent API proofs: one use across every server ----------------------------------------


def test_an_agent_api_proof_accepted_by_one_server_is_refused_by_the_other(pair: Pair) -> None:
    async def main() -> None:
        async with AdminClient(pair.a.admin_socket) as admin:
            token = await admin.generate_token()
            workload = await admin.create_entry(entry(f"spiffe://{TD}/replayed", token.agent_id))
        request = agent_v1_pb2.NewJWTSVIDRequest(entry_id=workload.id, audience=["x"])
        async with await agent_on(pair.a, token.token) as agent:
            on_b = agent.reconnect(pair.b.agent_api_address)
            stubs = {
                "A": agent_v1_grpc.SvidsStub(agent.channel),
                "B": agent_v1_grpc.SvidsStub(on_b.channel),
            }
            try:
                proof = agent.client.metadata(SVIDS, "NewJWTSVID")
                first = await bounded(run_call(stubs["A"].NewJWTSVID(request, metadata=proof)))
                assert first.token

                for server in ("B", "A"):  # to the other server, then back to the first
                    with pytest.raises(AgentApiError) as info:
                        await bounded(run_call(stubs[server].NewJWTSVID(request, metadata=proof)))
                    refused = info.value
                    assert (refused.status, refused.code) == (
                        Status.UNAUTHENTICATED,
                        "wpt_replayed",
                    ), server

                # The refusal is the replay, not B: a fresh proof is good there.
                fresh = agent.client.metadata(SVIDS, "NewJWTSVID")
                fresh_call = stubs["B"].NewJWTSVID(request, metadata=fresh)
                assert (await bounded(run_call(fresh_call))).token
            finally:
                on_b.channel.close()

    asyncio.run(main())


# -- entry changes reach agents on the other server -------------------------------------


def test_an_entry_created_through_a_reaches_an_agent_streaming_from_b(pair: Pair) -> None:
    async def main() -> None:
        async with AdminClient(pair.a.admin_socket) as admin:
            token = await admin.generate_token()
            async with await agent_on(pair.b, token.token) as agent:
                stream = sync_entries(agent.client)
                try:
                    assert (await bounded(anext(stream))).entries == ()
                    created = await admin.create_entry(
                        entry(f"spiffe://{TD}/pushed", token.agent_id)
                    )
                    update = await bounded(anext(stream))
                    assert [(e.id, str(e.spiffe_id)) for e in update.entries] == [
                        (created.id, f"spiffe://{TD}/pushed")
                    ]
                    # An update through A reaches B's stream too.
                    changed = replace_hint(created, "moved")
                    await admin.update_entry(changed)
                    update = await bounded(anext(stream))
                    assert [e.hint for e in update.entries] == ["moved"]
                finally:
                    await stream.aclose()

    asyncio.run(main())


def replace_hint(message: types_v1_pb2.Entry, hint: str) -> types_v1_pb2.Entry:
    copy = types_v1_pb2.Entry()
    copy.CopyFrom(message)
    copy.hint = hint
    return copy
