"""`make demo`: the WIMSE scenario end to end, on ``custos dev``'s pieces.

1. ``custos dev`` in this process (:mod:`custos.dev`): a server (SQLite), a software TPM,
   an agent attested to the server with a join token, its own key and workload keys in
   the TPM, entries for the current user;
2. workload-b: a Starlette app behind custos' verifier middleware, served by uvicorn on
   a free loopback port;
3. workload-a: httpx with ``WimseAuth`` whose proofs the agent signs through the TPM
   (``SyncWorkloadClient.signer``), calls workload-b; workload-b says who called;
4. the key's custody as the agent holds it (tier, key store, TPM object attributes), the
   WIT's confirmation key is that key, and the agent refuses to export it;
5. the same request sent again is refused by workload-b (replay).

Everything lives under ``./demo-state`` (``CUSTOS_DEMO_STATE``), started over on each
run, so running twice is safe; nothing reads stdin.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from custos.bundle import TrustBundle
    from custos.dev import DevEnvironment

STATE = Path(os.environ.get("CUSTOS_DEMO_STATE", "demo-state")).absolute()
BOUND = 30.0


def say(title: str) -> None:
    print(f"\n== {title}", flush=True)


def show(label: str, value: Any) -> None:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    print(f"   {label:<30} {text}", flush=True)


def workload_b(bundle: TrustBundle, origin: str) -> Any:
    """The relying party: an app that answers with the caller the middleware verified."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from custos.integrations.asgi import WimseASGIMiddleware
    from custos.wimse.verifier import build_request_verifier

    async def pay(request: Request) -> JSONResponse:
        caller = request.state.wimse_caller
        return JSONResponse({"paid": True, "caller": str(caller.subject)})

    app = Starlette(routes=[Route("/pay", pay, methods=["POST"])])
    return WimseASGIMiddleware(app, build_request_verifier(bundle, [origin]))


@contextlib.asynccontextmanager
async def serving(app: Any, port: int) -> AsyncIterator[None]:
    """uvicorn on 127.0.0.1:*port* in this event loop, for the block."""
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(BOUND):
            while not server.started:
                if task.done():
                    task.result()  # uvicorn's own error (e.g. the port was taken)
                    raise SystemExit("workload-b stopped at start")
                await asyncio.sleep(0.05)
        yield
    finally:
        server.should_exit = True
        await task


def workload_a(socket: Path, spiffe_id: str, url: str) -> list[tuple[str, Any]]:
    """Blocking, as an ordinary workload is: httpx + WimseAuth through the agent.
    Returns what it saw, for the main thread to print in order."""
    import httpx

    from custos.client import SyncWorkloadClient
    from custos.integrations.httpx import WimseAuth

    seen: list[tuple[str, Any]] = []
    sent: list[httpx.Request] = []
    with SyncWorkloadClient(socket) as agent, httpx.Client(
        timeout=BOUND, event_hooks={"request": [sent.append]}
    ) as http:
        ok = http.post(url, json={"amount": 10}, auth=WimseAuth(agent.signer(spiffe_id=spiffe_id)))
        seen.append(("status", ok.status_code))
        seen.append(("body", ok.json()))
        proof = sent[-1].headers.get("authorization") or sent[-1].headers.get(
            "workload-proof-token", ""
        )
        seen.append(("proof", proof))
        seen.append(("wit", sent[-1].headers.get("workload-identity-token", "")))
        # An attacker who captured that request sends it again, byte for byte.
        again = http.post(url, content=sent[-1].content, headers=dict(sent[-1].headers))
        seen.append(("replay", (again.status_code, again.json().get("code"))))
    return seen


def _claims(token: str) -> dict[str, Any]:
    part = token.split(".")[1]
    loaded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return loaded


def custody_report(env: DevEnvironment, spiffe_id: str, wit: str) -> None:
    """What holds the key that signed the proof, as the agent itself sees it."""
    from custos.keys import ExportRefusedError

    identity = next(i for i in env.agent.identities.all() if str(i.spiffe_id) == spiffe_id)
    store = identity.key.store
    show("custody tier (entry)", identity.custody)
    show("key", f"{identity.key.name} in {type(store).__name__}")
    key_attributes = getattr(store, "key_attributes", None)
    if key_attributes is not None:
        show("TPM object attributes", str(key_attributes(identity.key.name)))
    public = identity.key.public_jwk()
    cnf = _claims(wit).get("cnf", {}).get("jwk", {})
    same = all(cnf.get(k) == public.get(k) for k in ("kty", "crv", "x", "y"))
    show("WIT cnf.jwk is that key", "yes" if same else "NO")
    if not same:
        raise SystemExit("BUG: the WIT confirms another key than the one in the device")
    try:
        identity.private_key_pkcs8()
        raise SystemExit("BUG: the private key was exported")
    except ExportRefusedError as e:
        show("export the private key", f"refused [{e.code}]")


async def scenario() -> int:
    from custos.dev import dev_environment
    from custos.testing.server import free_port

    if STATE.exists():
        shutil.rmtree(STATE)  # the demo starts over on every run
    say("custos dev: a server (SQLite), a device, an agent attested with a join token")
    async with dev_environment(STATE) as env:
        show("device", f"{env.device}: {env.device_detail}")
        show("agent SPIFFE ID", str(env.agent.node.identity.spiffe_id))
        show("agent socket", f"unix://{env.socket_path}")
        show("admin socket", f"unix://{env.admin_socket}")
        for tier, spiffe_id in env.identities.items():
            show(f"entry ({tier})", spiffe_id)
        caller_id = env.identities[env.device]

        say("workload-b: Starlette + the custos verifier middleware, on a loopback port")
        b = f"http://127.0.0.1:{free_port()}"
        async with serving(workload_b(env.agent.identities.bundle(), b), int(b.rsplit(":", 1)[1])):
            show("listening", b)

            say(f"workload-a: httpx + WimseAuth, proofs signed by the agent ({env.device})")
            # Blocking client in a thread: the agent serves it on this event loop.
            seen = dict(await asyncio.to_thread(workload_a, env.socket_path, caller_id,
                                                f"{b}/pay"))  # fmt: skip
            show("POST /pay", seen["status"])
            show("workload-b saw the caller", seen["body"]["caller"])
            show("proof header", str(seen["proof"])[:60] + "…")
            if seen["status"] != 200 or seen["body"]["caller"] != caller_id:
                raise SystemExit(f"BUG: workload-b answered {seen['status']} {seen['body']}")

            say("where the proof was signed")
            custody_report(env, caller_id, seen["wit"])

            say("the same request, replayed")
            status, code = seen["replay"]
            show("replayed request", f"refused: {status} [{code}]")
            if status != 401:
                raise SystemExit("BUG: a replayed request was accepted")
    say("done: the server, the agent and the device are stopped")
    return 0


def main() -> int:
    from custos._extras import MissingExtraError, extra_needed
    from custos.errors import CustosError

    try:
        # custos[server,agent,httpx] and uvicorn: `make demo` installs them (`.[dev]`).
        with extra_needed("server"):
            import custos.server.app  # noqa: F401
        with extra_needed("httpx"):
            import httpx  # noqa: F401
        import uvicorn  # noqa: F401
    except MissingExtraError as e:
        print(f"error [{e.code}]: {e.message}", file=sys.stderr)
        return 1
    except ImportError:
        print("error [missing_dependency]: the demo needs uvicorn (pip install -e '.[dev]')",
              file=sys.stderr)  # fmt: skip
        return 1
    os.environ.setdefault("TSS2_LOG", "esys+none,tcti+none")
    try:
        return asyncio.run(scenario())
    except CustosError as e:
        print(f"error [{e.code}]: {e.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
