"""The agent's composition root (``custos.agent.app.Agent``) and ``custos agent run``
against a real server (``custos.testing.server``).

Every wait is bounded; nothing here asserts how fast anything happens.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import pytest
from grpclib.client import Channel

from common import agent_rig
from common.agent_rig import BOUND, add_entry, agent_config, agent_toml
from custos._proto import wimse_v1_pb2
from custos._proto.wimse_v1_grpc import WimseSigningStub
from custos.agent.app import Agent
from custos.agent.node import STATE_FILE, NodeIdentityError
from custos.errors import CustosError
from custos.server.admin.client import AdminClient
from custos.testing.server import ServerProcess, ServerRig, running_server

T = TypeVar("T")


rig, base = agent_rig.rig, agent_rig.base  # the shared fixtures


def test_agent_starts_serves_its_socket_and_stops_cleanly(rig: ServerRig, base: Path) -> None:
    async def main() -> None:
        async with running_server(rig) as srv:
            config = await agent_config(srv, base)
            async with Agent(config) as agent:
                assert agent.socket_path.is_socket()
                identity = agent.node.identity
                assert str(identity.spiffe_id).startswith("spiffe://example.org/custos/agent/")
                assert agent.identities.bundle().trust_domain.name == "example.org"
                assert agent.custody.offers("memory") and agent.custody.offers("exportable")
            assert not agent.socket_path.exists()  # stop removes the socket
            assert (base / "data" / STATE_FILE).exists()
            # A second agent on the same data_dir (the token is spent) serves at once.
            async with Agent(config) as again:
                assert again.node.identity.spiffe_id == identity.spiffe_id
                assert again.socket_path.is_socket()

    asyncio.run(main())


def test_a_failed_start_leaves_nothing_behind(rig: ServerRig, base: Path) -> None:
    async def main() -> None:
        async with running_server(rig) as srv:
            config = await agent_config(srv, base)
            async with Agent(config):
                pass
            # Another data_dir with the spent token: attestation refused, one error.
            other = base / "other"
            other.mkdir()
            spent = config.node_attestor.plugin().config["token"]
            assert isinstance(spent, str)
            refused = await agent_config(srv, other, spent)
            agent = Agent(refused)
            with pytest.raises(NodeIdentityError, match="node attestation refused") as e:
                await agent.start()
            assert e.value.code == "join_token_used"
            assert not refused.socket.exists()
            with pytest.raises(CustosError, match="not running"):
                _ = agent.node
            # The socket path is taken by a directory: one clear error, nothing left open.
            (base / "agent.sock").mkdir()
            agent = Agent(config)
            with pytest.raises(CustosError):
                await agent.start()
            (base / "agent.sock").rmdir()
            async with Agent(config) as agent:  # and the same configuration starts after
                assert agent.socket_path.is_socket()

    asyncio.run(main())


# ---- end to end: an entry, the socket, the server away ------------------------------------


async def sign_wpt(socket: Path, audience: str) -> wimse_v1_pb2.SignWPTResponse:
    """A WPT signed by the agent for this process (attested by its uid)."""
    channel = Channel(path=str(socket))
    try:
        stub = WimseSigningStub(channel)
        request = wimse_v1_pb2.SignWPTRequest(audience=audience)
        return await bounded(stub.SignWPT(request, timeout=BOUND))
    finally:
        channel.close()


async def bounded(aw: Awaitable[T]) -> T:
    return await asyncio.wait_for(aw, BOUND)


def test_an_entry_reaches_the_socket_and_survives_a_restart_without_the_server(
    rig: ServerRig, base: Path
) -> None:
    web = "spiffe://example.org/web"

    async def main() -> None:
        async with running_server(rig) as srv, AdminClient(srv.admin_socket) as admin:
            config = await agent_config(srv, base)
            async with Agent(config) as agent:
                await add_entry(admin, agent, web, [f"unix:uid:{os.getuid()}"])
                signed = await sign_wpt(agent.socket_path, "https://b.example/")
                assert signed.spiffe_id == web and signed.wpt and signed.wit
        # The server is gone; a restarted agent serves what its data_dir holds.
        async with Agent(config) as agent:
            assert [str(i.spiffe_id) for i in agent.identities.all()] == [web]
            signed = await sign_wpt(agent.socket_path, "https://b.example/")
            assert signed.spiffe_id == web and signed.wpt

    asyncio.run(main())


# ---- custos agent run ---------------------------------------------------------------------


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "custos", "agent", "run", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def test_agent_run_with_a_bad_config_is_one_line_and_exit_1(base: Path) -> None:
    (base / "agent.toml").write_text('trust_domain = "example.org"\n[server]\nport = 1\n')
    for config in (base / "agent.toml", base / "missing.toml"):
        process = _run("--config", str(config))
        out, err = process.communicate(timeout=BOUND)
        assert process.returncode == 1, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error [agent_config]: "), err
        assert out == ""


def _admin(rig: ServerRig, *args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "custos", *args, "--admin-socket", str(rig.admin_socket)],
        check=True, capture_output=True, text=True, timeout=BOUND,
    ).stdout  # fmt: skip


def _write_agent_toml(rig: ServerRig, base: Path) -> Path:
    """agent.toml for the server of ``rig`` (another process), set up as an operator
    would: its roots as PEM, a join token from the admin CLI."""
    bundle_file = base / "bundle.pem"
    bundle_file.write_text(_admin(rig, "bundle", "show", "--format", "pem"))
    secret = json.loads(_admin(rig, "token", "generate", "--output", "json"))["token"]
    path = base / "agent.toml"
    path.write_text(agent_toml(base, rig.agent_api_address, bundle_file, secret))
    return path


def test_agent_run_ready_then_sigterm_stops_cleanly(rig: ServerRig, base: Path) -> None:
    with ServerProcess(rig):
        process = _run("--config", str(_write_agent_toml(rig, base)))
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert line.startswith("custos agent ready: socket=unix://"), line
            assert f"unix://{base}/agent.sock" in line
            assert (base / "agent.sock").is_socket()
            process.send_signal(signal.SIGTERM)
            _, err = process.communicate(timeout=BOUND)
            assert process.returncode == 0, err
            assert not (base / "agent.sock").exists()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        # Started again with the same (spent) token: serves from its data_dir.
        process = _run("--config", str(base / "agent.toml"))
        try:
            assert process.stdout is not None
            deadline = time.monotonic() + BOUND
            line = process.stdout.readline()
            assert time.monotonic() < deadline
            assert line.startswith("custos agent ready"), process.stderr
            process.send_signal(signal.SIGINT)
            process.communicate(timeout=BOUND)
            assert process.returncode == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_agent_run_evicted_with_a_spent_token_exits_1_with_one_line(
    rig: ServerRig, base: Path
) -> None:
    with ServerProcess(rig):
        process = _run("--config", str(_write_agent_toml(rig, base)))
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert line.startswith("custos agent ready"), line
            agent_id = line.rsplit("spiffe_id=", 1)[1].strip()
            _admin(rig, "agent", "evict", agent_id)
            # The agent hears it on its streams, tries to attest again with its spent
            # token, is refused, stops cleanly and says what to do.
            _, err = process.communicate(timeout=BOUND)
            assert process.returncode == 1, err
            last = err.strip().splitlines()[-1]
            assert last.startswith("error [join_token_used]: "), err
            assert "must attest again" in last and "new one" in last
            assert not (base / "agent.sock").exists()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
