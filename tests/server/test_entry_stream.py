"""SyncEntries and StreamBundle end to end: a real server (``custos.testing.server``),
an agent attested with a join token through the client library, entries written
through the admin API, and the agent's streams (``custos.agent.client.streams``).

Every wait is bounded (a missing update fails the test instead of hanging it);
nothing here asserts how fast an update arrives (that is ``make bench``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import grpc
import pytest
from grpclib.client import Channel
from grpclib.const import Status

from common.eventually import eventually
from custos._proto import agent_v1_grpc, agent_v1_pb2, types_v1_pb2
from custos.agent.client.attest import AgentIdentity, InvalidServerResponseError
from custos.agent.client.calls import AgentApiClient
from custos.agent.client.channel import LimitedCodec
from custos.agent.client.errors import AgentApiError, run_call
from custos.agent.client.streams import (
    EntrySet,
    bundle_from_proto,
    entry_from_proto,
    stream_bundle,
    sync_entries,
)
from custos.bundle import TrustBundle
from custos.identity import SpiffeId, TrustDomain
from custos.keys import KeyStoreConfig, open_key_store
from custos.server.admin.client import AdminClient
from custos.server.app import Server
from custos.testing.postgres import PostgresServer, start_postgres
from custos.testing.server import RigAgent, ServerRig, running_server, server_agent
from custos.wimse.wit import mint_wit

TD = "example.org"
T = TypeVar("T")
BOUND = 20.0
#: Only a notification or a local bump may wake a stream in these tests, never the poll.
NO_POLL = {"events": {"poll_interval": "1h"}}


async def bounded(aw: Awaitable[T]) -> T:
    return await asyncio.wait_for(aw, BOUND)


@pytest.fixture
def rig() -> Iterator[ServerRig]:
    rig = ServerRig.create(sections=NO_POLL)
    yield rig
    rig.destroy()


def _entry(spiffe_id: str, parent_id: str, *selectors: str, **extra: Any) -> types_v1_pb2.Entry:
    return types_v1_pb2.Entry(
        spiffe_id=spiffe_id,
        parent_id=parent_id,
        selectors=list(selectors or ["unix:uid:1"]),
        **extra,
    )


def agent_id(agent: RigAgent) -> str:
    return str(agent.identity.spiffe_id)


def ids(entry_set: EntrySet) -> set[str]:
    return {str(e.spiffe_id) for e in entry_set.entries}


async def next_set(stream: AsyncIterator[EntrySet]) -> EntrySet:
    return await bounded(anext(stream))


def serve(rig: ServerRig, scenario: Callable[[Server], Awaitable[None]]) -> None:
    async def main() -> None:
        async with running_server(rig) as srv:
            await scenario(srv)

    asyncio.run(main())


def test_entries_created_updated_deleted_after_the_stream_opened_arrive(
    rig: ServerRig,
) -> None:
    async def scenario(srv: Server) -> None:
        async with await server_agent(srv) as agent, AdminClient(srv.admin_socket) as admin:
            stream = sync_entries(agent.client)
            first = await next_set(stream)
            assert first.entries == ()
            made = await admin.create_entry(_entry(f"spiffe://{TD}/web", agent_id(agent)))
            got = await next_set(stream)
            assert ids(got) == {f"spiffe://{TD}/web"}
            assert got.change_seq > first.change_seq
            [web] = got.entries
            assert (web.id, web.revision, web.key_custody) == (made.id, 1, "memory")
            assert str(web.parent_id) == agent_id(agent)

            # An entry for another agent does not send this agent a set: the next
            # set it gets is the one with its own second entry.
            await admin.create_entry(
                _entry(f"spiffe://{TD}/elsewhere", f"spiffe://{TD}/custos/agent/x/y")
            )
            await admin.create_entry(_entry(f"spiffe://{TD}/db", agent_id(agent), "unix:uid:2"))
            got = await next_set(stream)
            assert ids(got) == {f"spiffe://{TD}/web", f"spiffe://{TD}/db"}

            made.hint = "front end"
            made.revision = 1
            await admin.update_entry(made)
            got = await next_set(stream)
            assert {(e.hint, e.revision) for e in got.entries if e.id == made.id} == {
                ("front end", 2)
            }
            await admin.delete_entry(made.id)
            got = await next_set(stream)
            assert ids(got) == {f"spiffe://{TD}/db"}
            await stream.aclose()
        registry = srv.ctx.metrics.registry
        assert await eventually(
            lambda: registry.get_sample_value("custos_server_entry_updates_total") == 5
        )

    serve(rig, scenario)


def test_alias_entries_reach_the_agent(rig: ServerRig) -> None:
    """A join token's --spiffe-id alias and the entries under it are the agent's."""

    async def scenario(srv: Server) -> None:
        async with AdminClient(srv.admin_socket) as admin:
            async with await server_agent(srv) as agent:
                stream = sync_entries(agent.client)
                assert (await next_set(stream)).entries == ()
                # the node-group entry made under the agent as `token generate
                # --spiffe-id` does, then a workload under the group
                group = f"spiffe://{TD}/rack/7"
                await admin.create_entry(
                    _entry(group, agent_id(agent), f"spiffe_id:{agent_id(agent)}")
                )
                assert ids(await next_set(stream)) == {group}
                await admin.create_entry(_entry(f"spiffe://{TD}/rack/7/web", group))
                assert ids(await next_set(stream)) == {group, f"spiffe://{TD}/rack/7/web"}
                await stream.aclose()

    serve(rig, scenario)


def test_an_evicted_agents_stream_ends_permission_denied(rig: ServerRig) -> None:
    async def scenario(srv: Server) -> None:
        async with await server_agent(srv) as agent, AdminClient(srv.admin_socket) as admin:
            stream = sync_entries(agent.client)
            await next_set(stream)
            await admin.evict_agent(agent_id(agent))
            # any entry write wakes the stream, which looks at its agent again
            await admin.create_entry(_entry(f"spiffe://{TD}/web", agent_id(agent)))
            with pytest.raises(AgentApiError) as info:
                await next_set(stream)
            assert (info.value.status, info.value.code) == (
                Status.PERMISSION_DENIED,
                "agent_evicted",
            )

    serve(rig, scenario)


def test_a_call_without_credentials_is_unauthenticated(rig: ServerRig) -> None:
    async def scenario(srv: Server) -> None:
        async with await server_agent(srv) as agent:
            stub = agent_v1_grpc.EntriesStub(agent.channel)
            with pytest.raises(AgentApiError) as info:
                await bounded(run_call(stub.SyncEntries(agent_v1_pb2.SyncEntriesRequest())))
            assert info.value.status == Status.UNAUTHENTICATED
            bundles = agent_v1_grpc.BundlesStub(agent.channel)
            with pytest.raises(AgentApiError) as info:
                await bounded(run_call(bundles.StreamBundle(agent_v1_pb2.StreamBundleRequest())))
            assert info.value.status == Status.UNAUTHENTICATED

    serve(rig, scenario)


def test_bundle_stream_sends_the_bundle_then_each_rotation(rig: ServerRig) -> None:
    async def scenario(srv: Server) -> None:
        async with await server_agent(srv) as agent, AdminClient(srv.admin_socket) as admin:
            stream = stream_bundle(agent.client)
            first = await bounded(anext(stream))
            assert isinstance(first, TrustBundle)
            assert first.to_spiffe_dict()["keys"] == srv.ctx.bundle().to_spiffe_dict()["keys"]
            kids = await admin.rotate_keys()
            second = await bounded(anext(stream))
            published = {a.kid for a in second.jwt_authorities}
            assert {kids[1], kids[2]} <= published
            assert len(second.x509_authorities) == len(first.x509_authorities) + 1
            await stream.aclose()

    serve(rig, scenario)


@pytest.mark.slow
def test_an_entry_created_through_server_a_reaches_an_agent_on_server_b(
    postgres_db: str,
) -> None:
    """Two servers on one PostgreSQL: the write through A is heard by B through
    LISTEN/NOTIFY (the safety poll is an hour: it cannot be what delivers it)."""
    rig_a = ServerRig.create(datastore_url=postgres_db, sections=NO_POLL)
    # The servers share their signing keys as they would share an HSM token.
    shared = {"store": "exportable", "key_dir": str(rig_a.base / "keys")}
    rig_b = ServerRig.create(
        datastore_url=postgres_db,
        sections={
            **NO_POLL,
            **{f"{p}.key_store": shared for p in ("ca", "jwt_svid", "wit")},
        },
    )

    async def main() -> None:
        async with running_server(rig_a) as a, running_server(rig_b) as b:
            async with await server_agent(b) as agent, AdminClient(a.admin_socket) as admin:
                stream = sync_entries(agent.client)
                assert (await next_set(stream)).entries == ()
                await admin.create_entry(_entry(f"spiffe://{TD}/web", agent_id(agent)))
                assert ids(await next_set(stream)) == {f"spiffe://{TD}/web"}
                await stream.aclose()
                # A key rotation through A wakes B's bundle streams. (Not read through
                # B's stream here: B's exportable key store loads its directory
                # once, at open, so it cannot sign with or list A's new key files;
                # servers sharing keys share an HSM token in production.)
                seen = b.ctx.events.bundle_generation
                await admin.rotate_keys()
                assert await bounded(b.ctx.events.wait_bundle(seen)) > seen

    try:
        asyncio.run(main())
    finally:
        rig_a.destroy()
        rig_b.destroy()


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster of this test alone (the test stops it)."""
    server = start_postgres()
    try:
        yield server
    finally:
        server.destroy()


@pytest.mark.slow
def test_the_database_gone_ends_the_stream_unavailable_and_a_new_one_works(
    own_postgres: PostgresServer,
) -> None:
    rig = ServerRig.create(datastore_url=own_postgres.create_database(), sections=NO_POLL)

    async def main() -> None:
        async with running_server(rig) as srv, await server_agent(srv) as agent:
            entry = _entry(f"spiffe://{TD}/web", agent_id(agent))
            async with AdminClient(srv.admin_socket) as admin:
                await admin.create_entry(entry)
            stream = sync_entries(agent.client)
            assert ids(await next_set(stream)) == {f"spiffe://{TD}/web"}
            await asyncio.to_thread(own_postgres.stop)
            srv.ctx.events.entries_changed()  # as an admin write would
            with pytest.raises(AgentApiError) as info:
                await next_set(stream)
            assert (info.value.status, info.value.code) == (
                Status.UNAVAILABLE,
                "datastore_unavailable",
            )
            assert info.value.retryable
            await asyncio.to_thread(own_postgres.start)
            # the agent reconnects (its client signs a fresh proof per call)
            for _ in range(100):
                try:
                    again = await next_set(sync_entries(agent.client))
                    break
                except AgentApiError as e:
                    assert e.retryable, e
                    await asyncio.sleep(0.1)
            assert ids(again) == {f"spiffe://{TD}/web"}

    try:
        asyncio.run(main())
    finally:
        rig.destroy()


# -- what the client refuses from a server ---------------------------------------------


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"spiffe_id": "spiffe://other.org/web"}, "not in the agent's trust domain"),
        ({"spiffe_id": "not an id"}, "malformed"),
        ({"parent_id": ""}, "malformed"),
        ({"selectors": ["no-colon"]}, "malformed"),
        ({"selectors": []}, "no selectors"),
        ({"key_custody": "floppy"}, "unknown key custody"),
        ({"x509_svid_ttl": 0}, "TTL"),
        ({"id": ""}, "id"),
        ({"id": "x" * 65}, "id"),
    ],
)
def test_a_malformed_entry_from_the_server_is_refused(
    change: dict[str, Any], fragment: str
) -> None:
    fields: dict[str, Any] = {
        "id": "e1",
        "spiffe_id": f"spiffe://{TD}/web",
        "parent_id": f"spiffe://{TD}/custos/agent/join_token/t",
        "selectors": ["unix:uid:1"],
        "x509_svid_ttl": 3600,
        "jwt_svid_ttl": 300,
        "wit_ttl": 300,
        "key_custody": "tpm",
        "revision": 1,
    }
    good = entry_from_proto(types_v1_pb2.Entry(**fields), TrustDomain(TD))
    assert good.key_custody == "tpm" and good.expires_at is None
    with pytest.raises(InvalidServerResponseError) as info:
        entry_from_proto(types_v1_pb2.Entry(**{**fields, **change}), TrustDomain(TD))
    assert fragment in str(info.value)
    assert info.value.code == "agent_api_bad_response"


def test_a_bundle_of_another_trust_domain_or_malformed_is_refused() -> None:
    with pytest.raises(InvalidServerResponseError, match=r"other\.org"):
        bundle_from_proto(
            types_v1_pb2.Bundle(trust_domain="other.org", spiffe_bundle='{"keys": []}'),
            TrustDomain(TD),
        )
    with pytest.raises(InvalidServerResponseError, match="malformed"):
        bundle_from_proto(
            types_v1_pb2.Bundle(trust_domain=TD, spiffe_bundle="{not json"), TrustDomain(TD)
        )


# -- a hostile or broken server, seen by the client --------------------------------------


@asynccontextmanager
async def fake_server(replies: list[bytes]) -> AsyncIterator[AgentApiClient]:
    """A plain gRPC server whose SyncEntries sends ``replies`` (raw bytes) then ends
    cleanly, and a client (a made-up identity: nobody checks it here) talking to it."""

    async def sync(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        for reply in replies:
            yield reply

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "custos.agent.v1.Entries",
                {
                    "SyncEntries": grpc.unary_stream_rpc_method_handler(
                        sync, request_deserializer=bytes, response_serializer=bytes
                    )
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    keys = open_key_store(KeyStoreConfig(store="memory"))
    keys.create("fake", "ES256")
    keys.create("fake-issuer", "ES256")
    fake_id = SpiffeId.parse(f"spiffe://{TD}/custos/agent/join_token/t")
    identity = AgentIdentity(
        spiffe_id=fake_id,
        x509_svid=(),
        wit=mint_wit(
            keys.get("fake-issuer"), subject=fake_id, workload_public_jwk=keys.get("fake"), ttl=60
        ),
        bundle=TrustBundle(TD),
        selectors=(),
        expires_at=0.0,
        reattestable=False,
    )
    try:
        async with Channel("127.0.0.1", port, codec=LimitedCodec()) as channel:
            yield AgentApiClient(channel, identity, keys.get("fake"))
    finally:
        await server.stop(None)
        keys.close()


def _update(**entry: Any) -> bytes:
    fields = {
        "id": "e1",
        "spiffe_id": f"spiffe://{TD}/web",
        "parent_id": f"spiffe://{TD}/custos/agent/join_token/t",
        "selectors": ["unix:uid:1"],
        "x509_svid_ttl": 3600,
        "jwt_svid_ttl": 300,
        "wit_ttl": 300,
        "key_custody": "memory",
        "revision": 1,
        **entry,
    }
    message = agent_v1_pb2.EntriesUpdate(entries=[types_v1_pb2.Entry(**fields)], change_seq=7)
    return message.SerializeToString()


async def _stream_error(replies: list[bytes]) -> tuple[list[EntrySet], AgentApiError]:
    got: list[EntrySet] = []
    async with fake_server(replies) as client:
        with pytest.raises(AgentApiError) as info:
            async for entry_set in sync_entries(client):
                got.append(entry_set)
    return got, info.value


def test_client_a_good_set_then_a_clean_end_is_a_retryable_unavailable() -> None:
    got, error = asyncio.run(bounded(_stream_error([_update()])))
    assert [(ids(s), s.change_seq) for s in got] == [({f"spiffe://{TD}/web"}, 7)]
    assert error.status == Status.UNAVAILABLE and error.retryable


def test_client_an_entry_of_another_trust_domain_ends_the_stream() -> None:
    got, error = asyncio.run(bounded(_stream_error([_update(spiffe_id="spiffe://evil.org/x")])))
    assert got == []
    assert isinstance(error, InvalidServerResponseError)
    assert error.code == "agent_api_bad_response"


def test_client_bytes_that_are_no_message_end_the_stream_cleanly() -> None:
    got, error = asyncio.run(bounded(_stream_error([b"\xff\xff\xff\xff"])))
    assert got == []
    assert isinstance(error, InvalidServerResponseError)
    assert "does not parse as EntriesUpdate" in str(error)
