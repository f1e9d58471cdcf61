"""What reaches a caller on the wire when the datastore is away (issue 8, fix 8b):
a fixed line, never the driver's text (host, port, user of the database)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator

import pytest
from grpclib.const import Status

from custos.agent.client.calls import X509Params
from custos.agent.client.errors import AgentApiError
from custos.errors import CustosError
from custos.testing.postgres import PostgresServer, start_postgres
from custos.testing.server import ServerRig, join_token_agent, new_csr, running_server, server_agent

RigFactory = Callable[..., ServerRig]

FIXED = "datastore_unavailable: the datastore is unavailable"


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A cluster of this test alone: the test stops it."""
    server = start_postgres()
    try:
        yield server
    finally:
        server.destroy()


def _assert_secret(text: str, pg: PostgresServer) -> None:
    lowered = text.lower()
    for leak in (str(pg.port), "127.0.0.1", "connection", "postgres", "psycopg"):
        assert leak not in lowered, text


def test_a_stopped_database_is_one_fixed_line_on_the_wire(
    own_postgres: PostgresServer,
    server_rig_factory: RigFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = server_rig_factory(datastore_url=own_postgres.create_database())

    async def run() -> None:
        async with running_server(rig) as srv, await server_agent(srv) as agent:
            entry = await asyncio.to_thread(
                srv.ctx.datastore.entries.create,
                "spiffe://example.org/w",
                agent.identity.spiffe_id,
                ["unix:uid:1"],
            )
            _, secret = await asyncio.to_thread(srv.ctx.datastore.join_tokens.create, 600)
            bundle = await asyncio.to_thread(srv.ctx.bundle)
            await asyncio.to_thread(own_postgres.stop)

            with pytest.raises(AgentApiError) as svids:
                await agent.client.new_x509_svids([X509Params(entry.id, new_csr(), "memory")])
            assert svids.value.status is Status.UNAVAILABLE
            assert svids.value.code == "datastore_unavailable"
            assert f"{svids.value.code}: {svids.value.message}" == FIXED
            _assert_secret(str(svids.value), own_postgres)

            # AttestAgent is called before any authentication: nothing of the
            # database may reach an unauthenticated caller either.
            with pytest.raises(CustosError) as attest:
                await join_token_agent(
                    srv.agent_api_address,
                    bundle,
                    secret,
                    server_name=srv.config.agent_api.dns_name,
                )
            assert attest.value.code == "datastore_unavailable"
            _assert_secret(str(attest.value), own_postgres)

    with caplog.at_level(logging.INFO, logger="custos.server.agent_api"):
        asyncio.run(run())
    # The reason is kept for the operator, in the server's log.
    assert any(
        "datastore_unavailable" in r.getMessage() and str(own_postgres.port) in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]
