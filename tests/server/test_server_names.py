"""Every server's DNS name is reserved, not only this server's (issue 8, fix 8b;
decision 0055): servers on one database may be configured with different
``agent_api.dns_name`` values, and an agent trusts a certificate carrying any of
them as that server. Each server records its name in the datastore at start; the
admin API and the issuer of every server refuse every recorded name."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from custos._proto import types_v1_pb2
from custos.agent.client.calls import X509Params
from custos.server.admin.client import AdminApiError, AdminClient
from custos.server.datastore import Datastore
from custos.testing.server import ServerRig, new_csr, running_server, server_agent

TD = "example.org"


def _rig(url: str, keys: Path, dns_name: str) -> ServerRig:
    shared = {"store": "exportable", "key_dir": str(keys)}
    return ServerRig.create(
        datastore_url=url,
        sections={
            "agent_api": {"dns_name": dns_name},
            "events": {"poll_interval": "1h"},
            **{f"{p}.key_store": shared for p in ("ca", "jwt_svid", "wit")},
        },
    )


def test_another_servers_dns_name_is_refused_in_entries_and_certificates(
    postgres_db: str, tmp_path: Path
) -> None:
    rig_a = _rig(postgres_db, tmp_path / "keys", "server-a.example.org")
    rig_b = _rig(postgres_db, tmp_path / "keys", "server-b.example.org")

    async def run() -> None:
        async with running_server(rig_a), running_server(rig_b) as b:
            async with await server_agent(b) as agent, AdminClient(b.admin_socket) as admin:
                parent = str(agent.identity.spiffe_id)
                # A's name, through B's admin API (any case, a trailing dot): refused
                for name in ("server-a.example.org", "Server-A.Example.org."):
                    with pytest.raises(AdminApiError) as refused:
                        await admin.create_entry(
                            types_v1_pb2.Entry(
                                spiffe_id=f"spiffe://{TD}/w",
                                parent_id=parent,
                                selectors=["unix:uid:1"],
                                dns_names=[name],
                            )
                        )
                    assert refused.value.code == "reserved_dns_name"
                assert await admin.count_entries() == 0

                # entries already stored with A's name (written before the rule):
                # B issues nothing for them; a name of no server is issued
                ds = b.ctx.datastore
                made = [
                    await asyncio.to_thread(
                        ds.entries.create,
                        f"spiffe://{TD}/w{i}",
                        agent.identity.spiffe_id,
                        ["unix:uid:1"],
                        dns_names=[name],
                    )
                    for i, name in enumerate(["server-a.example.org", "web.example.org"])
                ]
                issued = await agent.client.new_x509_svids(
                    [X509Params(e.id, new_csr(), "memory") for e in made]
                )
                assert issued[0].error is not None
                assert issued[0].error.code == "reserved_dns_name"
                assert issued[1].error is None

    asyncio.run(run())
    # both names are on record for every server of the database
    with Datastore.open(postgres_db, trust_domain=TD) as ds:
        assert {"server-a.example.org", "server-b.example.org"} <= ds.server_names.names()


def test_recording_a_name_is_idempotent_and_normalised(store: Datastore) -> None:
    assert store.server_names.names() == frozenset()
    store.server_names.record("Custos.Example.org.")
    store.server_names.record("custos.example.org")
    store.server_names.record("other")
    assert store.server_names.names() == {"custos.example.org", "other"}
