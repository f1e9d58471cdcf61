"""azure_msi through a real server (its ``[node_attestors.azure_msi]`` table in
server.toml, AttestAgent over the Agent API): trust on first use — the same token, or
any token of the same VM identity, attests once; a replay is refused until the agent
is evicted."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from common.server_attestor_rig import TD, attest, server_rig
from custos.agent.client.attest import AgentIdentity
from custos.agent.client.errors import AgentApiError
from custos.plugin import PluginConfig
from custos.server.app import Server
from custos.testing.fake_azure import FakeAzure
from custos.testing.server import ServerRig, running_server

RESOURCE = "https://custos.example.org/attest"


async def _attest(srv: Server, endpoint: str) -> AgentIdentity:
    """An agent of its own key store, attested with the token served at ``endpoint``."""
    return await attest(
        srv, PluginConfig("azure_msi", {"endpoint": endpoint, "resource": RESOURCE})
    )


def test_a_replayed_token_is_refused_until_the_agent_is_evicted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with FakeAzure().running() as azure:
        sections = {
            "node_attestors.azure_msi": {"jwks_file": azure.write_jwks(tmp_path / "jwks.json")},
            f"node_attestors.azure_msi.tenants.{azure.tenant}": {"resource": RESOURCE},
        }

        async def scenario(
            rig: ServerRig,
        ) -> tuple[AgentIdentity, AgentApiError, AgentApiError, AgentIdentity]:
            async with running_server(rig) as srv:
                first = await _attest(srv, azure.endpoint)
                with pytest.raises(AgentApiError) as replay:
                    await _attest(srv, azure.endpoint)
                # A token the agent did not send (e.g. stolen) and still valid: refused too.
                wrong = FakeAzure(tenant=azure.tenant)
                with pytest.raises(AgentApiError) as bad:
                    async with asyncio.timeout(30):
                        wrong.key = azure.key
                        wrong.published = azure.published
                        wrong.resource_group = "evil:rg"
                        with wrong.running():
                            await _attest(srv, wrong.endpoint)
                await asyncio.to_thread(srv.ctx.datastore.agents.evict, first.spiffe_id)
                again = await _attest(srv, azure.endpoint)
                return first, replay.value, bad.value, again

        with server_rig(sections) as rig:
            first, replay, bad, again = asyncio.run(scenario(rig))
    assert (
        str(first.spiffe_id)
        == f"spiffe://{TD}/custos/agent/azure_msi/{azure.tenant}/{azure.principal}"
    )
    assert first.reattestable is False
    assert f"vm-name:{azure.resource_group}:{azure.vm_name}" in {s.value for s in first.selectors}
    assert replay.code == "agent_already_attested"
    assert bad.code == "azure_msi_not_a_vm"
    assert "azure_msi attestation refused (azure_msi_not_a_vm)" in caplog.text
    assert again.spiffe_id == first.spiffe_id
