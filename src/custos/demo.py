"""`make demo`: the WIMSE scenario end to end, on ``custos dev``'s pieces.

1. ``custos dev`` in this process (:mod:`custos.dev`): a server (SQLite), a software TPM,
   an agent attested to the server by that TPM (EK certificate from swtpm's local CA, AK
   activated against the EK, a quote of PCRs 0-3 and 7), its own key and workload keys
   in the TPM, certified by the AK, entries for the current user;
2. workload-b: a Starlette app behind custos' verifier middleware, served by uvicorn on
   a free loopback port;
3. workload-a: httpx with ``WimseAuth`` whose proofs the agent signs through the TPM
   (``SyncWorkloadClient.signer``), calls workload-b; workload-b says who called;
4. the key's custody as the agent holds it (tier, key store, TPM object attributes), the
   residency the server recorded when it issued the WIT ("proven": the AK certified the
   key), the WIT's confirmation key is that key, and the agent refuses to export it;
5. the same request sent again is refused by workload-b (replay);
6. (as root) two workloads under uids 1001 and 1002, with ``exportable`` entries, fetch
   their X.509-SVIDs with py-spiffe, unchanged, and talk mutual TLS with spiffe-tls, each
   accepting only the other's SPIFFE ID.

Everything lives under ``./demo-state`` (``CUSTOS_DEMO_STATE``), started over on each
run, so running twice is safe; nothing reads stdin.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from custos.bundle import TrustBundle
    from custos.dev import DevEnvironment

STATE = Path(os.environ.get("CUSTOS_DEMO_STATE", "demo-state")).absolute()
BOUND = 30.0
TRUST_DOMAIN = "example.org"


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
    if identity.custody == "tpm":
        records = env.server.ctx.datastore.audit.since(0)
        wits = [r for r in records if r.event == "wit" and r.identity == spiffe_id]
        residency = wits[-1].residency if wits else "none recorded"
        show("key residency (server audit)", residency)
        if env.attestor == "tpm" and residency != "proven":
            raise SystemExit("BUG: a TPM-attested agent's tpm key was not proven resident")
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
    say("custos dev: a server (SQLite), a device, an agent attested by its TPM (or a join token)")
    # The agent's socket in a directory other users may enter (the data directory is
    # 0700): the mTLS workloads below run under their own uids.
    run = STATE / "run"
    run.mkdir(parents=True)
    for d in (STATE, run):
        d.chmod(0o755)
    async with dev_environment(STATE / "dev", run / "agent.sock") as env:
        show("device", f"{env.device}: {env.device_detail}")
        show("agent SPIFFE ID", str(env.agent.node.identity.spiffe_id))
        show("agent attested by", env.attestor)
        for selector in env.agent.node.identity.selectors:
            if selector.type == "tpm" and not selector.value.startswith("pcr:"):
                show("agent selector", str(selector))
        pcrs = [s.value.split(":")[2] for s in env.agent.node.identity.selectors
                if s.type == "tpm" and s.value.startswith("pcr:")]  # fmt: skip
        if pcrs:
            show("PCRs quoted (sha256)", ",".join(pcrs))
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
            await mtls_part(env)
    say("done: the server, the agent and the device are stopped")
    return 0


# ---- two exportable workloads, mutual TLS with py-spiffe / spiffe-tls ----------------------

SERVER_UID, CLIENT_UID = 1001, 1002
MTLS_SERVER = f"spiffe://{TRUST_DOMAIN}/demo/mtls-server"
MTLS_CLIENT = f"spiffe://{TRUST_DOMAIN}/demo/mtls-client"


async def mtls_part(env: DevEnvironment) -> None:
    """Two workloads under their own uids get exportable X.509-SVIDs from the agent with
    py-spiffe, unchanged, and talk mutual TLS with spiffe-tls, each checking the other's ID."""
    from custos._proto import types_v1_pb2
    from custos.dev import wait_for_identities
    from custos.server.admin.client import AdminClient
    from custos.testing.server import free_port

    say(f"two exportable workloads (uids {SERVER_UID}, {CLIENT_UID}): mTLS with py-spiffe")
    if os.geteuid() != 0:
        show("skipped", f"running workloads as uids {SERVER_UID}/{CLIENT_UID} needs root")
        return
    if importlib.util.find_spec("spiffetls") is None:
        show("skipped", "py-spiffe / spiffe-tls are not installed (pip install -e '.[dev]')")
        return
    parent = str(env.agent.node.identity.spiffe_id)
    async with AdminClient(env.admin_socket) as admin:
        for spiffe_id, uid in ((MTLS_SERVER, SERVER_UID), (MTLS_CLIENT, CLIENT_UID)):
            await admin.create_entry(types_v1_pb2.Entry(
                spiffe_id=spiffe_id, parent_id=parent, selectors=[f"unix:uid:{uid}"],
                key_custody="exportable"))  # fmt: skip
            show(f"entry (uid {uid})", spiffe_id)
    await wait_for_identities(env.agent, {MTLS_SERVER, MTLS_CLIENT})
    address = f"127.0.0.1:{free_port()}"
    server_out, client_out = await asyncio.to_thread(_run_pair, env.socket_path, address)
    for line in server_out + client_out:
        label, _, value = line.partition(": ")
        show(label, value)


def _child(role: str, uid: int, socket: Path, *args: str) -> subprocess.Popen[str]:
    # Started as root and dropping to *uid* itself once its libraries are loaded
    # (:func:`_become`): the interpreter may live where other users cannot read (a pyenv
    # under /root), and what the agent sees is the uid at connect time (SO_PEERCRED).
    env = dict(os.environ, SPIFFE_ENDPOINT_SOCKET=f"unix://{socket}")
    return subprocess.Popen(
        [sys.executable, "-m", "custos.demo", role, str(uid), *args],
        cwd="/", env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def _become(uid: int) -> None:
    """Drop to *uid* (group too, no supplementary groups), for good."""
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def _run_pair(socket: Path, address: str) -> tuple[list[str], list[str]]:
    server = _child("mtls-server", SERVER_UID, socket, address, MTLS_CLIENT)
    try:
        assert server.stdout is not None
        ready = server.stdout.readline().strip()
        if not ready.startswith("server listening"):
            raise SystemExit(f"BUG: the mTLS server did not start: {ready!r}")
        client = _child("mtls-client", CLIENT_UID, socket, address, MTLS_SERVER)
        try:
            client_out, _ = client.communicate(timeout=BOUND)
            # A client that failed never connects: the server would wait for ever.
            server_rest = server.communicate(timeout=BOUND)[0] if client.returncode == 0 else ""
        except subprocess.TimeoutExpired:
            client.kill()
            client.wait()
            raise SystemExit("BUG: the mTLS workloads did not finish") from None
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    if client.returncode != 0 or server.returncode != 0:
        raise SystemExit(f"BUG: mTLS workloads exited {server.returncode}/{client.returncode}")
    return [ready, *server_rest.splitlines()], client_out.splitlines()


def mtls_server(uid: str, address: str, expected_client: str) -> int:
    """(uid 1001) serve one mTLS connection with the SVID py-spiffe fetched."""
    from cryptography import x509
    from spiffe import SpiffeId, X509Source
    from spiffetls import ListenOptions, listen
    from spiffetls.tlsconfig.authorize import authorize_id

    _become(int(uid))
    with X509Source() as source:
        me = source.get_x509_context().default_svid.spiffe_id
        listener = listen(address, source,
                          ListenOptions(authorize_fn=authorize_id(SpiffeId(expected_client))))
        print(f"server listening: {address} as {me} (uid {os.getuid()})", flush=True)
        conn, _ = listener.accept()
        request = conn.recv(1024).decode()
        peer = conn.get_peer_certificate()
        uri = ""
        if peer is not None:  # spiffe-tls has checked it is the expected client already
            san = peer.to_cryptography().extensions.get_extension_for_class(
                x509.SubjectAlternativeName)
            uri = ", ".join(san.value.get_values_for_type(x509.UniformResourceIdentifier))
        print(f"server saw client: {uri} said {request!r}", flush=True)
        conn.sendall(f"hello {uri}".encode())
        conn.shutdown()
        conn.close()
        listener.close()
    return 0


def mtls_client(uid: str, address: str, expected_server: str) -> int:
    """(uid 1002) dial the server, accepting only the expected SPIFFE ID."""
    from spiffe import SpiffeId, X509Source
    from spiffetls import dial
    from spiffetls.tlsconfig.authorize import authorize_id

    _become(int(uid))
    with X509Source() as source:
        me = source.get_x509_context().default_svid.spiffe_id
        conn = dial(address, source, authorize_fn=authorize_id(SpiffeId(expected_server)))
        conn.sendall(b"ping")
        answer = conn.recv(1024).decode()
        print(f"client (uid {os.getuid()}): {me} got {answer!r}", flush=True)
        conn.close()
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
    # The two mTLS workloads are this module again, run under their own uids.
    if sys.argv[1:2] == ["mtls-server"]:
        sys.exit(mtls_server(*sys.argv[2:5]))
    if sys.argv[1:2] == ["mtls-client"]:
        sys.exit(mtls_client(*sys.argv[2:5]))
    sys.exit(main())
