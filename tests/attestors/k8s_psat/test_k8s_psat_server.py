"""k8s_psat through a real server: its ``[node_attestors.k8s_psat.clusters.<name>]`` table
in server.toml, AttestAgent over the Agent API against the fake API server. The
attestor re-attests: the same node attests again with its rotated token; once the
agent's pod is deleted its token (even replayed) no longer attests."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from custos.agent.client.attest import AgentIdentity, attest_agent
from custos.agent.client.channel import open_channel
from custos.agent.client.errors import AgentApiError
from custos.keys import KeyStoreConfig, open_key_store
from custos.plugin import AgentCatalog, PluginConfig
from custos.server.app import Server
from custos.testing.fake_kube import FakeKube, make_tls
from custos.testing.server import ServerRig, running_server

TD = "example.org"


async def _attest(srv: Server, token_path: Path) -> AgentIdentity:
    keys = open_key_store(KeyStoreConfig(store="memory"))
    try:
        keys.create("agent", "ES256")
        settings = {"cluster": "prod", "token_path": str(token_path)}
        with AgentCatalog.load(
            TD,
            node_attestors=[PluginConfig("k8s_psat", settings)],
            workload_attestors=[PluginConfig("example")],
        ) as catalog:
            channel = open_channel(
                srv.agent_api_address,
                bundle=srv.ctx.bundle(),
                server_name=srv.ctx.config.agent_api.dns_name,
            )
            async with channel:
                return await attest_agent(
                    channel, attestor=catalog.node_attestor, key=keys.get("agent"), custody="memory"
                )
    finally:
        keys.close()


def test_a_node_attests_again_and_a_deleted_pods_token_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    fake = FakeKube(make_tls(tmp_path / "tls"))
    node = fake.add_node("node-a")
    pod = fake.add_pod("custos", "custos-agent-1", node, "custos-agent")
    token = tmp_path / "token"
    with fake.running():
        rig = ServerRig.create(
            sections={
                "node_attestors.k8s_psat.clusters.prod": {
                    "service_account_allow_list": ["custos:custos-agent"],
                    "kube_config_file": fake.write_kubeconfig(tmp_path / "kubeconfig"),
                }
            }
        )

        async def scenario() -> tuple[AgentIdentity, AgentIdentity, AgentApiError]:
            async with running_server(rig) as srv:
                token.write_text(fake.token(pod, ["custos-server"]))
                first = await _attest(srv, token)
                token.write_text(fake.token(pod, ["custos-server"]))  # rotated
                again = await _attest(srv, token)
                del fake.pods[("custos", pod.name)]
                with pytest.raises(AgentApiError) as gone:
                    await _attest(srv, token)
                return first, again, gone.value

        try:
            first, again, gone = asyncio.run(scenario())
        finally:
            rig.destroy()
    assert str(first.spiffe_id) == f"spiffe://{TD}/custos/agent/k8s_psat/prod/{node.uid}"
    assert first.reattestable is True
    assert again.spiffe_id == first.spiffe_id
    assert "agent_sa:custos-agent" in {s.value for s in first.selectors}
    assert gone.code == "k8s_psat_not_authenticated"
    assert "k8s_psat attestation refused (k8s_psat_not_authenticated)" in caplog.text
