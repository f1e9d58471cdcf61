"""End to end: a real server, a real agent running the ``unix`` and ``systemd`` workload
attestors, an entry that needs ``systemd:id:<unit>``, and callers on the agent's socket:
the process moved into the unit's cgroup (cgroup v1 ``name=systemd``, made by the test as
root) gets the identity; another process of the same uid does not."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from custos._proto import types_v1_pb2
from custos.agent.app import Agent
from custos.agent.config import agent_config_from_toml
from custos.server.admin.client import AdminClient
from custos.testing.server import ServerRig, running_server

BOUND = 30.0
SVC = "spiffe://example.org/svc/billing"

CALLER = r"""
import asyncio, sys
from grpclib.client import Channel
from grpclib.exceptions import GRPCError
from custos._proto import wimse_v1_pb2
from custos._proto.wimse_v1_grpc import WimseSigningStub

sys.stdin.readline()

async def main():
    channel = Channel(path=sys.argv[1])
    try:
        stub = WimseSigningStub(channel)
        try:
            r = await stub.SignWPT(wimse_v1_pb2.SignWPTRequest(audience="https://b.example/"),
                                   timeout=30)
            print("ID", r.spiffe_id)
        except GRPCError as e:
            print("STATUS", e.status.name)
    finally:
        channel.close()

asyncio.run(main())
"""


def systemd_root() -> str:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fstype, _src, options = post.split()[:3]
            if fstype == "cgroup" and "name=systemd" in options.split(","):
                return pre.split()[4]
    pytest.fail("no cgroup v1 name=systemd hierarchy is mounted here")


@pytest.fixture
def rig() -> Iterator[ServerRig]:
    rig = ServerRig.create(sections={"events": {"poll_interval": "1h"}})
    yield rig
    rig.destroy()


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="custos-sd-"))  # short: the socket path
    yield path
    shutil.rmtree(path, ignore_errors=True)


def agent_toml(base: Path, address: str, bundle: Path, token: str, units: Path) -> str:
    return f"""
trust_domain = "example.org"
socket = "{base}/agent.sock"
data_dir = "{base}/data"

[server]
address = "{address}"
bundle_file = "{bundle}"

[node_attestor.join_token]
token = "{token}"

[workload_attestors.unix]

[workload_attestors.systemd]
unit_directories = ["{units}"]

[custody.memory]
[custody.exportable]

[agent_key]
custody = "exportable"
"""


async def call(socket: Path, cgroup: str | None) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CALLER, str(socket),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        if cgroup is not None:
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write(str(proc.pid))
        out, err = await asyncio.wait_for(proc.communicate(b"go\n"), BOUND)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    return out.decode().strip()


def test_only_the_unit_s_process_gets_the_unit_s_identity(rig: ServerRig, base: Path) -> None:
    unit = f"custos-billing-{secrets.token_hex(4)}.service"
    units = base / "units"
    units.mkdir()
    (units / unit).write_text("[Service]\nExecStart=/usr/bin/billing\n")
    cgroup = os.path.join(systemd_root(), f"custos-e2e-{secrets.token_hex(4)}.slice", unit)
    made = [d for d in (os.path.dirname(cgroup), cgroup) if not os.path.isdir(d)]
    for d in made:
        os.mkdir(d)  # the kernel refusing fails the test: never a skip

    async def main() -> tuple[str, str]:
        async with running_server(rig) as srv, AdminClient(srv.admin_socket) as admin:
            _, token = await asyncio.to_thread(srv.ctx.datastore.join_tokens.create, 600)
            bundle = await asyncio.to_thread(srv.ctx.bundle)
            await asyncio.to_thread(bundle.save, base / "bundle.json")
            config = agent_config_from_toml(
                agent_toml(base, srv.agent_api_address, base / "bundle.json", token, units)
            )
            async with Agent(config) as agent:
                seen = agent.identities.generation
                await admin.create_entry(
                    types_v1_pb2.Entry(
                        spiffe_id=SVC,
                        parent_id=str(agent.node.identity.spiffe_id),
                        selectors=[
                            f"systemd:id:{unit}",
                            f"systemd:fragment_path:{units / unit}",
                        ],
                        key_custody="exportable",
                    )
                )
                while not agent.identities.all():
                    seen = await asyncio.wait_for(agent.identities.wait_changed(seen), BOUND)
                inside = await call(agent.socket_path, cgroup)
                outside = await call(agent.socket_path, None)
                return inside, outside

    try:
        inside, outside = asyncio.run(main())
    finally:
        for d in reversed(made):
            os.rmdir(d)
    assert inside == f"ID {SVC}"
    assert outside.startswith("STATUS ") and SVC not in outside
