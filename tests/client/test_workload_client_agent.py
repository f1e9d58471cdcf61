"""The client against a whole agent (custos.agent.app.Agent / ``custos agent run``)
attested to a real server (custos.testing.server): an httpx client with WimseAuth
through the agent calls a Starlette app with the verifier middleware, which sees
the caller's identity and refuses a replay; the same client keeps working across
an agent restart. Every wait is bounded; nothing asserts how fast."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from test_agent_app import agent_toml

from custos._proto import types_v1_pb2
from custos.agent.app import Agent
from custos.agent.config import agent_config_from_toml
from custos.bundle import TrustBundle
from custos.client import SyncWorkloadClient, WorkloadApiDeniedError, WorkloadClient
from custos.integrations.asgi import WimseASGIMiddleware
from custos.integrations.httpx import WimseAuth
from custos.server.admin.client import AdminClient
from custos.testing.server import ServerProcess, ServerRig, running_server
from custos.wimse.verifier import build_request_verifier

BOUND = 30.0
WEB = "spiffe://example.org/web"
ORIGIN = "https://b.example"
SELECTOR = f"unix:uid:{os.getuid()}"
T = TypeVar("T")


def relying_party(bundle: TrustBundle) -> WimseASGIMiddleware:
    async def pay(request: Request) -> JSONResponse:
        return JSONResponse({"sub": str(request.state.wimse_caller.subject)})

    app = Starlette(routes=[Route("/pay", pay, methods=["POST"])])
    return WimseASGIMiddleware(app, build_request_verifier(bundle, [ORIGIN]))


def call_through_the_agent(socket: Path, bundle: TrustBundle) -> None:
    """workload-a (httpx + WimseAuth, key in the agent) calls workload-b."""
    sent = []
    with SyncWorkloadClient(socket) as agent, TestClient(relying_party(bundle),
                                                         base_url=ORIGIN) as http:
        http.event_hooks["request"].append(sent.append)
        ok = http.post("/pay", content=b'{"amount": 5}', auth=WimseAuth(agent.signer()))
        assert ok.status_code == 200, ok.text
        assert ok.json() == {"sub": WEB}
        replayed = http.post("/pay", content=b'{"amount": 5}', headers=dict(sent[-1].headers))
        assert (replayed.status_code, replayed.json()["code"]) == (401, "wpt_replayed")


def test_httpx_through_a_whole_agent_reaches_the_app_as_the_workload(
    rig: ServerRig, base: Path
) -> None:
    async def main() -> None:
        async with running_server(rig) as srv, AdminClient(srv.admin_socket) as admin:
            _, token = await asyncio.to_thread(srv.ctx.datastore.join_tokens.create, 600)
            bundle = await asyncio.to_thread(srv.ctx.bundle)
            await asyncio.to_thread(bundle.save, base / "bundle.json")
            config = agent_config_from_toml(
                agent_toml(base, srv.agent_api_address, base / "bundle.json", token))
            async with Agent(config) as agent:
                seen = agent.identities.generation
                await admin.create_entry(types_v1_pb2.Entry(
                    spiffe_id=WEB, parent_id=str(agent.node.identity.spiffe_id),
                    selectors=[SELECTOR], key_custody="memory"))
                while not agent.identities.all():
                    seen = await asyncio.wait_for(agent.identities.wait_changed(seen), BOUND)
                async with WorkloadClient(agent.socket_path) as client:
                    wit, _ = await client.sign_wpt(f"{ORIGIN}/pay")
                    assert (await client.fetch_wit()).wit == wit
                # The blocking client off this loop: the agent serves on it.
                await asyncio.to_thread(call_through_the_agent, agent.socket_path,
                                        agent.identities.bundle())

    asyncio.run(main())


# ---- across an agent restart (custos agent run in a child process) -------------------------


def custos(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "custos", *args], check=True,
                          capture_output=True, text=True, timeout=BOUND).stdout


def start_agent(config: Path) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "custos", "agent", "run", "--config", str(config)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith("custos agent ready"), line
    return process, line.rsplit("spiffe_id=", 1)[1].strip()


def until_served(call: Callable[[], T]) -> T:
    """``call()`` once the agent serves this process's entry: PERMISSION_DENIED
    until its credentials exist (just created, or re-issued for a memory key
    after a restart). Bounded."""
    deadline = time.monotonic() + BOUND
    while True:
        try:
            return call()
        except WorkloadApiDeniedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=BOUND)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_the_same_client_carries_on_across_an_agent_restart(rig: ServerRig, base: Path) -> None:
    with ServerProcess(rig):
        admin = ("--admin-socket", str(rig.admin_socket))
        (base / "bundle.pem").write_text(custos("bundle", "show", *admin, "--format", "pem"))
        secret = json.loads(custos("token", "generate", *admin, "--output", "json"))["token"]
        config = base / "agent.toml"
        config.write_text(agent_toml(base, rig.agent_api_address, base / "bundle.pem", secret))
        process, agent_id = start_agent(config)
        try:
            custos("entry", "create", *admin, "--spiffe-id", WEB, "--parent-id", agent_id,
                   "--selector", SELECTOR, "--custody", "memory")
            loop = asyncio.new_event_loop()
            aclient = WorkloadClient(base / "agent.sock", timeout=BOUND)
            with SyncWorkloadClient(base / "agent.sock", timeout=BOUND) as client:
                first = until_served(client.fetch_wit)
                assert str(first.spiffe_id) == WEB
                assert loop.run_until_complete(aclient.fetch_wit()).wit == first.wit
                stop(process)
                # A call made while no agent is there waits for the next one.
                got: list[object] = []
                waiting = threading.Thread(
                    target=lambda: got.append(until_served(client.fetch_wit)))
                waiting.start()
                process, _ = start_agent(config)
                waiting.join(BOUND)
                assert [str(w.spiffe_id) for w in got] == [WEB]  # type: ignore[attr-defined]
                wit, _ = client.sign_wpt(f"{ORIGIN}/pay")
                # A memory key dies with the agent: the new one has its own WIT.
                assert wit == client.fetch_wit().wit != first.wit
                # The asyncio client's connection died with the first agent too.
                again = loop.run_until_complete(aclient.sign_wpt(f"{ORIGIN}/pay"))
                assert again.wit == wit
            loop.run_until_complete(aclient.close())
            loop.close()
        finally:
            stop(process)
