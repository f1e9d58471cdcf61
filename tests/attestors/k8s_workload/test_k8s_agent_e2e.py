"""End to end: a real server, a real agent (``custos.agent.app.Agent``) running the
``unix`` and ``k8s`` workload attestors against the fake kubelet, an entry that needs
``k8s:`` selectors, and callers on the agent's socket — one process in a cgroup named
as the kubelet names it gets the identity, another process of the same uid outside it
gets nothing.  The agent takes the caller's pidfd from the kernel (SO_PEERPIDFD)."""

from __future__ import annotations

import asyncio
import os
import secrets
import uuid
from pathlib import Path

from common import agent_rig
from common.agent_rig import add_entry, agent_config, call, cgroup, cgroup_v1_root
from custos.agent.app import Agent
from custos.server.admin.client import AdminClient
from custos.testing.fake_kubelet import FakeKubelet, pod
from custos.testing.server import ServerRig, running_server

rig, base = agent_rig.rig, agent_rig.base  # the shared fixtures

WEB = "spiffe://example.org/payments/web"


def k8s_attestor(kubelet: FakeKubelet) -> str:
    return f"""
[workload_attestors.k8s]
kubelet_host = "127.0.0.1"
kubelet_secure_port = {kubelet.port}
kubelet_ca_path = "{kubelet.ca_path}"
token_path = "{kubelet.token_path}"
"""


def test_only_the_pod_s_process_gets_the_pod_s_identity(
    rig: ServerRig, base: Path, tmp_path: Path
) -> None:
    pod_uid, cid = str(uuid.uuid4()), secrets.token_hex(32)
    relative = f"custos-e2e-{secrets.token_hex(4)}/kubepods/burstable/pod{pod_uid}/{cid}"
    with cgroup(cgroup_v1_root("pids"), relative) as group, FakeKubelet(str(tmp_path)) as kubelet:
        kubelet.pods = [
            pod(
                name="web-0",
                uid=pod_uid,
                namespace="payments",
                service_account="web",
                containers=[{"name": "web", "image": "web:1", "id": cid}],
            )
        ]

        async def main() -> tuple[str, str]:
            async with running_server(rig) as srv, AdminClient(srv.admin_socket) as admin:
                config = await agent_config(srv, base, attestors=k8s_attestor(kubelet))
                async with Agent(config) as agent:
                    selectors = ["k8s:ns:payments", "k8s:sa:web", f"unix:uid:{os.getuid()}"]
                    await add_entry(admin, agent, WEB, selectors)
                    inside = await call(agent.socket_path, group)
                    outside = await call(agent.socket_path, None)
                    return inside, outside

        inside, outside = asyncio.run(main())
    assert inside == f"ID {WEB}"
    assert outside.startswith("STATUS ") and WEB not in outside
