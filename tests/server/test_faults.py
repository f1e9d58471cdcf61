"""Faults (issue 8, "Bad input and faults"): the database gone and back, a restart, a
server killed (SIGKILL) in the middle of batch issuance."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from grpclib.const import Status

from common.eventually import eventually
from custos.agent.client.calls import X509Params
from custos.agent.client.errors import AgentApiError
from custos.server.admin.client import AdminApiError, AdminClient
from custos.server.datastore import Datastore
from custos.server.health import admin_health
from custos.server.wire import bundle_from_proto
from custos.testing.postgres import PostgresServer, start_postgres
from custos.testing.server import (
    RigAgent,
    ServerProcess,
    ServerRig,
    join_token_agent,
    new_csr,
    running_server,
    server_agent,
)

from .test_federation import https_get, web_pki_federation

RigFactory = Callable[..., ServerRig]
TD = "example.org"


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster of this test alone: the test stops it, which would break
    every other test sharing the session's cluster."""
    server = start_postgres()
    try:
        yield server
    finally:
        server.destroy()


async def _until(attempt: Callable[[], object], *, tries: int = 100) -> object:
    """Call the coroutine function *attempt* until it stops raising (bounded)."""
    for i in range(tries):
        try:
            return await attempt()  # type: ignore[misc]
        except Exception:
            if i == tries - 1:
                raise
            await asyncio.sleep(0.1)
    raise AssertionError("unreachable")


def test_database_gone_is_unavailable_and_the_server_recovers_without_restart(
    own_postgres: PostgresServer, server_rig_factory: RigFactory, tmp_path: Path
) -> None:
    ca_file, federation = web_pki_federation(tmp_path)
    rig = server_rig_factory(
        datastore_url=own_postgres.create_database(), sections={"federation": federation}
    )
    bundle_request = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"

    async def run() -> None:
        async with running_server(rig) as srv, await server_agent(srv) as agent:
            entry = await asyncio.to_thread(
                srv.ctx.datastore.entries.create,
                "spiffe://example.org/w",
                agent.identity.spiffe_id,
                ["unix:uid:1"],
            )
            request = [X509Params(entry.id, new_csr(), "memory")]
            async with AdminClient(rig.admin_socket, timeout=20) as admin:
                assert await admin.count_entries() == 1
                assert not (await agent.client.new_x509_svids(request))[0].error

                await asyncio.to_thread(own_postgres.stop)

                with pytest.raises(AdminApiError) as refused:
                    await admin.count_entries()
                assert refused.value.status is Status.UNAVAILABLE
                assert refused.value.code == "datastore_unavailable"
                with pytest.raises(AgentApiError) as unavailable:
                    await agent.client.new_x509_svids(request)
                assert unavailable.value.status is Status.UNAVAILABLE
                assert unavailable.value.retryable
                # Agent API calls refused for the database are counted like admin ones.
                assert await eventually(
                    lambda: srv.ctx.metrics.registry.get_sample_value(
                        "custos_server_datastore_errors_total",
                        {"operation": "/custos.agent.v1.Svids/BatchNewX509SVID"},
                    )
                )
                assert not await admin_health(rig.admin_socket)
                assert srv.federation_address is not None
                answer = await https_get(srv.federation_address, ca_file, bundle_request)
                assert answer.startswith(b"HTTP/1.1 503 ")
                # The server process is still there and answers; nothing crashed.
                await srv.maintain_once()
                assert srv.health.status("") != 1

                await asyncio.to_thread(own_postgres.start)

                assert await _until(admin.count_entries) == 1
                issued = await _until(lambda: agent.client.new_x509_svids(request))
                assert not issued[0].error  # type: ignore[index]
                await srv.maintain_once()
                assert srv.health.status("") == 1
                answer = await https_get(srv.federation_address, ca_file, bundle_request)
                assert answer.startswith(b"HTTP/1.1 200 ")

    asyncio.run(run())


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_restart_keeps_entries_tokens_agents_keys_and_bundle(
    backend: str, server_rig_factory: RigFactory, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("postgres_db") if backend == "postgresql" else None
    rig = server_rig_factory(datastore_url=url)

    async def first_life() -> tuple[object, ...]:
        async with running_server(rig) as srv:
            ds = srv.ctx.datastore
            async with AdminClient(rig.admin_socket) as admin:
                used = (await admin.generate_token(ttl=600)).token
                spare = (await admin.generate_token(ttl=600)).token
                await admin.rotate_keys()  # two keys per purpose in the bundle
            agent = await join_token_agent(srv.agent_api_address, srv.ctx.bundle(), used)
            await agent.close()
            entry = await asyncio.to_thread(
                ds.entries.create, "spiffe://example.org/w", agent.identity.spiffe_id, ["a:b"]
            )
            audit = await asyncio.to_thread(ds.audit.since, 0)
            return agent, entry, used, spare, srv.ctx.bundle(), audit

    agent, entry, used, spare, bundle, audit = asyncio.run(first_life())
    assert isinstance(agent, RigAgent)

    async def second_life() -> None:
        async with running_server(rig) as srv:
            ds = srv.ctx.datastore
            after = srv.ctx.bundle()
            assert after.x509_authorities == bundle.x509_authorities  # type: ignore[attr-defined]
            assert {a.kid for a in after.jwt_authorities} == {
                a.kid
                for a in bundle.jwt_authorities  # type: ignore[attr-defined]
            }
            assert len(after.x509_authorities) == 2
            assert await asyncio.to_thread(ds.entries.get, entry.id) == entry  # type: ignore[attr-defined]
            assert (await asyncio.to_thread(ds.audit.since, 0))[: len(audit)] == audit  # type: ignore[arg-type]
            stored = await asyncio.to_thread(ds.agents.get, agent.identity.spiffe_id)
            assert not stored.evicted and not stored.banned
            # The agent's credentials from before the restart still authenticate it.
            client = agent.reconnect(srv.agent_api_address)
            try:
                issued = await client.new_x509_svids(
                    [X509Params(entry.id, new_csr(), "memory")]  # type: ignore[attr-defined]
                )
                assert not issued[0].error
            finally:
                client.channel.close()
            # The consumed token stays consumed; the unused one still works once.
            with pytest.raises(AgentApiError):
                await join_token_agent(srv.agent_api_address, after, used)  # type: ignore[arg-type]
            second = await join_token_agent(srv.agent_api_address, after, spare)  # type: ignore[arg-type]
            await second.close()

    asyncio.run(second_life())


# -- kill -9 in the middle of batch issuance -------------------------------------------

BATCH = 200
CONCURRENT = 4


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_sigkill_during_batch_issuance_leaves_no_half_written_state(
    backend: str, server_rig_factory: RigFactory, request: pytest.FixtureRequest
) -> None:
    """ "Consistent" after a crash means (checked below):

    1. the database passes SQLite's integrity check (PostgreSQL: rolls back what was
       not committed by itself) and the server starts on it;
    2. every batch is audited whole or not at all (a batch's rows share one
       timestamp: each group has exactly BATCH rows);
    3. every certificate an agent received is in the audit, and its CA key's recorded
       last expiry covers it (so the key is never pruned while it is still valid);
    4. nothing else moved: entries, the agent, the consumed token, the keys and the
       bundle are as before, and the agent gets certificates again after the restart.
    """
    url = request.getfixturevalue("postgres_db") if backend == "postgresql" else None
    rig = server_rig_factory(datastore_url=url)
    with ServerProcess(rig) as proc:
        received, agent, entry_id, bundle = asyncio.run(_load_then_kill(rig, proc))
        # after the kill
        assert proc.process is not None and proc.process.returncode == -9

    if backend == "sqlite":
        with contextlib.closing(sqlite3.connect(rig.url.removeprefix("sqlite:///"))) as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)

    with Datastore.open(rig.url, trust_domain=TD) as ds:
        rows = [
            r
            for r in ds.audit.since(0, limit=100_000)
            if r.event == "x509-svid" and r.identity == "spiffe://example.org/w"
        ]
        groups = Counter(r.at for r in rows)
        assert groups and set(groups.values()) == {BATCH}, groups
        audited = {r.serial_or_jti: r.not_after for r in rows}
        assert received  # some batches came back before the kill
        ca_keys = ds.signing_keys.of_purpose("x509-ca")
        last = max(k.last_not_after or 0.0 for k in ca_keys)
        for serial, not_after in received.items():
            assert audited[serial] == not_after
            assert last >= not_after
        assert ds.entries.get(entry_id).spiffe_id.path == "/w"
        assert not ds.agents.get(agent.identity.spiffe_id).evicted

    with ServerProcess(rig):

        async def after_restart() -> None:
            async with AdminClient(rig.admin_socket) as admin:
                again = bundle_from_proto(await admin.get_bundle())
            assert again.x509_authorities == bundle.x509_authorities
            client = agent.reconnect()
            try:
                issued = await client.new_x509_svids([X509Params(entry_id, new_csr(), "memory")])
                assert not issued[0].error
            finally:
                client.channel.close()

        asyncio.run(after_restart())


async def _load_then_kill(
    rig: ServerRig, proc: ServerProcess
) -> tuple[dict[str, float], RigAgent, str, object]:
    async with AdminClient(rig.admin_socket) as admin:
        secret = (await admin.generate_token(ttl=600)).token
        bundle = bundle_from_proto(await admin.get_bundle())
    agent = await join_token_agent(rig.agent_api_address, bundle, secret)
    with Datastore.open(rig.url, trust_domain=TD) as ds:
        entry = ds.entries.create("spiffe://example.org/w", agent.identity.spiffe_id, ["a:b"])
    csrs = [new_csr() for _ in range(BATCH)]
    received: dict[str, float] = {}
    first_batch = asyncio.Event()

    async def issue_forever() -> None:
        while True:
            results = await agent.client.new_x509_svids(
                [X509Params(entry.id, csr, "memory") for csr in csrs]
            )
            for r in results:
                assert r.error is None
                received[format(r.cert_chain[0].serial_number, "x")] = r.expires_at
            first_batch.set()

    workers = [asyncio.ensure_future(issue_forever()) for _ in range(CONCURRENT)]
    try:
        await first_batch.wait()
        # Other batches are in flight now (four callers, each sending its next batch
        # as soon as one returns): SIGKILL lands in the middle of issuance.
        await asyncio.to_thread(proc.kill)
        done = await asyncio.gather(*workers, return_exceptions=True)
        assert all(isinstance(e, AgentApiError) for e in done), done
    finally:
        for w in workers:
            w.cancel()
        await agent.close()
    return received, agent, entry.id, bundle
