"""The rig of the agent end-to-end tests: a real server, a real agent, callers on its socket.

Why this module: ``tests/agent/test_agent_app.py`` and the end-to-end tests of the
``k8s``, ``systemd`` and ``docker`` workload attestors each carried their own copy of the
same server fixture, short agent directory, agent TOML, "create an entry and wait until
the agent holds it" loop, and (k8s, systemd) the caller process moved into a cgroup.
Only the workload attestor sections and the selectors differ; those are the arguments.

Import the fixtures by name (``from common.agent_rig import base, rig``): pytest finds
them in the test module's namespace.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from custos._proto import types_v1_pb2
from custos.agent.app import Agent
from custos.agent.config import AgentConfig, agent_config_from_toml
from custos.server.admin.client import AdminClient
from custos.server.app import Server
from custos.testing.server import ServerRig

BOUND = 30.0


@pytest.fixture
def rig() -> Iterator[ServerRig]:
    """A server's configuration and files (events polled hourly: entries reach the agent
    through its streams, not a poll)."""
    rig = ServerRig.create(sections={"events": {"poll_interval": "1h"}})
    yield rig
    rig.destroy()


@pytest.fixture
def base() -> Iterator[Path]:
    """The agent's directory; short: its socket path must fit in 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="custos-agt-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def agent_toml(base: Path, address: str, bundle_file: Path, token: str, attestors: str = "") -> str:
    """An agent attested by join token, the ``unix`` workload attestor and the TOML
    ``attestors`` adds (more ``[workload_attestors.<name>]`` sections)."""
    return f"""
trust_domain = "example.org"
socket = "{base}/agent.sock"
data_dir = "{base}/data"

[server]
address = "{address}"
bundle_file = "{bundle_file}"

[node_attestor.join_token]
token = "{token}"

[workload_attestors.unix]
{attestors}
[custody.memory]
[custody.exportable]

[agent_key]
custody = "exportable"
"""


async def agent_config(
    srv: Server, base: Path, token: str | None = None, attestors: str = ""
) -> AgentConfig:
    """The agent's configuration for ``srv``: its bundle saved in ``base``, a new join
    token unless ``token``, and :func:`agent_toml`'s ``attestors``."""
    if token is None:
        _, secret = await asyncio.to_thread(srv.ctx.datastore.join_tokens.create, 600)
    else:
        secret = token
    bundle = await asyncio.to_thread(srv.ctx.bundle)
    await asyncio.to_thread(bundle.save, base / "bundle.json")
    return agent_config_from_toml(
        agent_toml(base, srv.agent_api_address, base / "bundle.json", secret, attestors)
    )


async def add_entry(
    admin: AdminClient, agent: Agent, spiffe_id: str, selectors: Sequence[str]
) -> None:
    """An entry for ``spiffe_id`` under ``agent`` (exportable keys); returns once the
    agent holds an identity."""
    seen = agent.identities.generation
    await admin.create_entry(
        types_v1_pb2.Entry(
            spiffe_id=spiffe_id,
            parent_id=str(agent.node.identity.spiffe_id),
            selectors=list(selectors),
            key_custody="exportable",
        )
    )
    while not agent.identities.all():
        seen = await asyncio.wait_for(agent.identities.wait_changed(seen), BOUND)


# ---- a caller in a cgroup ------------------------------------------------------------------

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


async def call(socket: Path, cgroup: str | None) -> str:
    """Start a caller, move it into ``cgroup`` (if given), let it call; its answer
    (``ID <spiffe id>`` or ``STATUS <grpc status>``)."""
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


def cgroup_v1_root(option: str) -> str:
    """Where the cgroup v1 hierarchy with mount option ``option`` (``pids``,
    ``name=systemd``) is mounted; fails the test (never a skip) if none is."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fstype, _src, options = post.split()[:3]
            if fstype == "cgroup" and option in options.split(","):
                return pre.split()[4]
    pytest.fail(f"no cgroup v1 {option} hierarchy is mounted here")


@contextmanager
def cgroup(root: str, relative: str) -> Iterator[str]:
    """``root/relative``, its missing directories made (the kernel refusing fails the
    test: never a skip) and removed afterwards."""
    made = []
    try:
        parts = relative.split("/")
        for i in range(len(parts)):
            d = os.path.join(root, *parts[: i + 1])
            if not os.path.isdir(d):
                os.mkdir(d)
                made.append(d)
        yield os.path.join(root, relative)
    finally:
        for d in reversed(made):
            os.rmdir(d)


__all__ = [
    "BOUND",
    "CALLER",
    "add_entry",
    "agent_config",
    "agent_toml",
    "base",
    "call",
    "cgroup",
    "cgroup_v1_root",
    "rig",
]
