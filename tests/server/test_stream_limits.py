"""Push streams never outlive their credentials and one agent cannot hold many
(issue 8, fix 8b; decision 0056): SyncEntries and StreamBundle end UNAVAILABLE
when the WIT that opened them expires or the agent attests again, so the agent
opens them again with its current WIT; a ninth stream of one agent is
RESOURCE_EXHAUSTED."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest
from grpclib.const import Status

from custos._proto import types_v1_pb2
from custos.agent.client.errors import AgentApiError
from custos.agent.client.streams import stream_bundle, sync_entries
from custos.server.admin.client import AdminClient
from custos.server.agent_api.entries import MAX_STREAMS_PER_AGENT
from custos.server.app import Server
from custos.testing.server import ServerRig, running_server, server_agent

T = TypeVar("T")
BOUND = 20.0
NO_POLL = {"events": {"poll_interval": "1h"}}


async def bounded(aw: Awaitable[T]) -> T:
    return await asyncio.wait_for(aw, BOUND)


def serve(rig: ServerRig, scenario: Callable[[Server], Awaitable[None]]) -> None:
    async def main() -> None:
        async with running_server(rig) as srv:
            await scenario(srv)

    try:
        asyncio.run(main())
    finally:
        rig.destroy()


async def ended(stream: AsyncIterator[Any]) -> AgentApiError:
    """Read ``stream`` until it ends; the error it ended with."""
    with pytest.raises(AgentApiError) as info:
        while True:
            await bounded(anext(stream))
    return info.value


def test_streams_end_when_the_wit_that_opened_them_expires() -> None:
    # The agent's credentials live 3 s: its streams must end with them, not run on.
    rig = ServerRig.create(sections={**NO_POLL, "x509_svid": {"default_ttl": "3s"}})

    async def scenario(srv: Server) -> None:
        async with await server_agent(srv) as agent:
            entries, bundles = sync_entries(agent.client), stream_bundle(agent.client)
            await bounded(anext(entries))
            await bounded(anext(bundles))
            for error in (await ended(entries), await ended(bundles)):
                assert (error.status, error.code) == (Status.UNAVAILABLE, "wit_expired")
                assert error.retryable

    serve(rig, scenario)


def test_streams_end_when_the_agent_attests_again() -> None:
    rig = ServerRig.create(sections=NO_POLL)

    async def scenario(srv: Server) -> None:
        async with await server_agent(srv) as agent:
            stream = sync_entries(agent.client)
            assert (await bounded(anext(stream))).entries == ()
            ds = srv.ctx.datastore
            stored = await asyncio.to_thread(ds.agents.get, agent.identity.spiffe_id)
            # What an attestation records (a new key, a new WIT for it).
            await asyncio.to_thread(
                ds.agents.attested,
                stored.id,
                attestor=stored.attestor,
                selectors=stored.selectors,
                serial="02",
                expires_at=stored.expires_at,
                now=stored.updated_at + 1,
            )
            # an entry of this agent wakes the stream: it must end, not send it
            async with AdminClient(srv.admin_socket) as admin:
                await admin.create_entry(
                    types_v1_pb2.Entry(
                        spiffe_id="spiffe://example.org/web",
                        parent_id=str(stored.id),
                        selectors=["unix:uid:1"],
                    )
                )
            error = await ended(stream)
            assert (error.status, error.code) == (Status.UNAVAILABLE, "agent_reattested")

    serve(rig, scenario)


def test_one_agent_holds_at_most_eight_streams() -> None:
    rig = ServerRig.create(sections=NO_POLL)

    async def scenario(srv: Server) -> None:
        async with await server_agent(srv) as agent:
            opened: list[AsyncIterator[Any]] = []
            for i in range(MAX_STREAMS_PER_AGENT):
                stream = (sync_entries if i % 2 else stream_bundle)(agent.client)
                await bounded(anext(stream))  # served: it counts now
                opened.append(stream)
            extra = sync_entries(agent.client)
            error = await ended(extra)
            assert (error.status, error.code) == (
                Status.RESOURCE_EXHAUSTED,
                "too_many_streams",
            )
            assert error.retryable
            # another agent is not affected by this one's streams
            async with await server_agent(srv) as other:
                other_stream = sync_entries(other.client)
                await bounded(anext(other_stream))
                await other_stream.aclose()
            # a closed stream frees its place
            await opened.pop().aclose()

            async def reopen() -> None:
                stream = sync_entries(agent.client)
                try:
                    await bounded(anext(stream))
                finally:
                    await stream.aclose()

            await _until(reopen)
            for stream in opened:
                await stream.aclose()

    serve(rig, scenario)


async def _until(attempt: Callable[[], Awaitable[object]], *, tries: int = 100) -> None:
    """The server counts a stream closed once it sees the cancellation: retry (bounded)."""
    for i in range(tries):
        try:
            await attempt()
            return
        except AgentApiError as e:
            if e.code != "too_many_streams" or i == tries - 1:
                raise
            await asyncio.sleep(0.05)
