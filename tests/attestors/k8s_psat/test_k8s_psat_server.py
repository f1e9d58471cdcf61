"""k8s_psat through a real server: its ``[node_attestors.k8s_psat.clusters.<name>]`` table
in server.toml, AttestAgent over the Agent API against the fake API server. The
attestor re-attests: the same node attests again with its rotated token; once the
agent's pod is deleted its token (even replayed) no longer attests."""

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
from custos.testing.fake_kube import FakeKube, make_tls
from custos.testing.server import ServerRig, running_server


async def _attest(srv: Server, token_path: Path) -> AgentIdentity:
    """An agent of its own key store, attested with the token in ``token_path``."""
    settings = {"cluster": "prod", "token_path": str(token_path)}
    return await attest(srv, PluginConfig("k8s_psat", settings))


def test_a_node_attests_again_and_a_deleted_pods_token_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    fake = FakeKube(make_tls(tmp_path / "tls"))
    node = fake.add_node("node-a")
    pod = fake.add_pod("custos", "custos-agent-1", node, "custos-agent")
    token = tmp_path / "token"
    with fake.running():
        cluster = {
            "service_account_allow_list": ["custos:custos-agent"],
            "kube_config_file": fake.write_kubeconfig(tmp_path / "kubeconfig"),
        }

        async def scenario(rig: ServerRig) -> tuple[AgentIdentity, AgentIdentity, AgentApiError]:
            async with running_server(rig) as srv:
                token.write_text(fake.token(pod, ["custos-server"]))
                first = await _attest(srv, token)
                token.write_text(fake.token(pod, ["custos-server"]))  # rotated
                again = await _attest(srv, token)
                del fake.pods[("custos", pod.name)]
                with pytest.raises(AgentApiError) as gone:
                    await _attest(srv, token)
                return first, again, gone.value

        with server_rig({"node_attestors.k8s_psat.clusters.prod": cluster}) as rig:
            first, again, gone = asyncio.run(scenario(rig))
    assert str(first.spiffe_id) == f"spiffe://{TD}/custos/agent/k8s_psat/prod/{node.uid}"
    assert first.reattestable is True
    assert again.spiffe_id == first.spiffe_id
    assert "agent_sa:custos-agent" in {s.value for s in first.selectors}
    assert gone.code == "k8s_psat_not_authenticated"
    assert "k8s_psat attestation refused (k8s_psat_not_authenticated)" in caplog.text
