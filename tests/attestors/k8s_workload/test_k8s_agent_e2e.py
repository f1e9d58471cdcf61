"""End to end: a real server, a real agent (``custos.agent.app.Agent``) running the
``unix`` and ``k8s`` workload attestors against the fake kubelet, an entry that needs
``k8s:`` selectors, and callers on the agent's socket — one process in a cgroup named
as the kubelet names it gets the identity, another process of the same uid outside it
gets nothing.  The agent takes the caller's pidfd from the kernel (SO_PEERPIDFD)."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from custos._proto import types_v1_pb2
from custos.agent.app import Agent
from custos.agent.config import agent_config_from_toml
from custos.server.admin.client import AdminClient
from custos.testing.fake_kubelet import FakeKubelet, pod
from custos.testing.server import ServerRig, running_server

BOUND = 30.0
WEB = "spiffe://example.org/payments/web"

# The caller: waits for "go" on stdin (the test moves it into the cgroup meanwhile), then
# asks the agent for a WPT and prints the SPIFFE ID it was signed for, or the gRPC status.
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


def pids_root() -> str:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fstype, _src, options = post.split()[:3]
            if fstype == "cgroup" and "pids" in options.split(","):
                return pre.split()[4]
    pytest.fail("no cgroup v1 pids hierarchy is mounted here")


@pytest.fixture
def rig() -> Iterator[ServerRig]:
    rig = ServerRig.create(sections={"events": {"poll_interval": "1h"}})
    yield rig
    rig.destroy()


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="custos-k8s-"))  # short: the socket path
    yield path
    shutil.rmtree(path, ignore_errors=True)


def agent_toml(base: Path, address: str, bundle: Path, token: str, kubelet: FakeKubelet) -> str:
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

[workload_attestors.k8s]
kubelet_host = "127.0.0.1"
kubelet_secure_port = {kubelet.port}
kubelet_ca_path = "{kubelet.ca_path}"
token_path = "{kubelet.token_path}"

[custody.memory]
[custody.exportable]

[agent_key]
custody = "exportable"
"""


async def call(socket: Path, cgroup: str | None) -> str:
    """Start a caller, move it into ``cgroup`` (if given), let it call; its answer."""
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


def test_only_the_pod_s_process_gets_the_pod_s_identity(
    rig: ServerRig, base: Path, tmp_path: Path
) -> None:
    pod_uid, cid = str(uuid.uuid4()), secrets.token_hex(32)
    relative = f"custos-e2e-{secrets.token_hex(4)}/kubepods/burstable/pod{pod_uid}/{cid}"
    root = pids_root()
    made = []
    for i in range(len(relative.split("/"))):
        d = os.path.join(root, *relative.split("/")[: i + 1])
        if not os.path.isdir(d):
            os.mkdir(d)  # the kernel refusing fails the test: never a skip
            made.append(d)
    try:
        with FakeKubelet(str(tmp_path)) as kubelet:
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
                    _, token = await asyncio.to_thread(srv.ctx.datastore.join_tokens.create, 600)
                    bundle = await asyncio.to_thread(srv.ctx.bundle)
                    await asyncio.to_thread(bundle.save, base / "bundle.json")
                    config = agent_config_from_toml(
                        agent_toml(base, srv.agent_api_address, base / "bundle.json", token,
                                   kubelet)
                    )  # fmt: skip
                    async with Agent(config) as agent:
                        seen = agent.identities.generation
                        await admin.create_entry(
                            types_v1_pb2.Entry(
                                spiffe_id=WEB,
                                parent_id=str(agent.node.identity.spiffe_id),
                                selectors=[
                                    "k8s:ns:payments",
                                    "k8s:sa:web",
                                    f"unix:uid:{os.getuid()}",
                                ],
                                key_custody="exportable",
                            )
                        )
                        while not agent.identities.all():
                            seen = await asyncio.wait_for(
                                agent.identities.wait_changed(seen), BOUND
                            )
                        inside = await call(agent.socket_path, os.path.join(root, relative))
                        outside = await call(agent.socket_path, None)
                        return inside, outside

            inside, outside = asyncio.run(main())
    finally:
        for d in reversed(made):
            os.rmdir(d)
    assert inside == f"ID {WEB}"
    assert outside.startswith("STATUS ") and WEB not in outside
