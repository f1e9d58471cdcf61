"""End to end: a real server, a real agent running the ``unix`` and ``systemd`` workload
attestors, an entry that needs ``systemd:id:<unit>``, and callers on the agent's socket:
the process moved into the unit's cgroup (cgroup v1 ``name=systemd``, made by the test as
root) gets the identity; another process of the same uid does not."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

from common import agent_rig
from common.agent_rig import add_entry, agent_config, call, cgroup, cgroup_v1_root
from custos.agent.app import Agent
from custos.server.admin.client import AdminClient
from custos.testing.server import ServerRig, running_server

rig, base = agent_rig.rig, agent_rig.base  # the shared fixtures

SVC = "spiffe://example.org/svc/billing"


def test_only_the_unit_s_process_gets_the_unit_s_identity(rig: ServerRig, base: Path) -> None:
    unit = f"custos-billing-{secrets.token_hex(4)}.service"
    units = base / "units"
    units.mkdir()
    (units / unit).write_text("[Service]\nExecStart=/usr/bin/billing\n")
    systemd = f'\n[workload_attestors.systemd]\nunit_directories = ["{units}"]\n'

    async def main(group: str) -> tuple[str, str]:
        async with running_server(rig) as srv, AdminClient(srv.admin_socket) as admin:
            config = await agent_config(srv, base, attestors=systemd)
            async with Agent(config) as agent:
                selectors = [f"systemd:id:{unit}", f"systemd:fragment_path:{units / unit}"]
                await add_entry(admin, agent, SVC, selectors)
                inside = await call(agent.socket_path, group)
                outside = await call(agent.socket_path, None)
                return inside, outside

    relative = f"custos-e2e-{secrets.token_hex(4)}.slice/{unit}"
    with cgroup(cgroup_v1_root("name=systemd"), relative) as group:
        inside, outside = asyncio.run(main(group))
    assert inside == f"ID {SVC}"
    assert outside.startswith("STATUS ") and SVC not in outside
