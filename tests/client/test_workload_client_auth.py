"""The agent as the signer of WimseAuth / WimseRequestsAuth: a relying party
(Starlette + the verifier middleware) sees the caller's identity; the key stays
in the agent; a replayed request is refused. Also the CLI against the same socket."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from test_workload_api import Rig

from cli_runner import run_custos
from custos.client import AgentProofSigner, SyncWorkloadClient
from custos.integrations.asgi import WimseASGIMiddleware
from custos.integrations.httpx import WimseAuth
from custos.integrations.requests import WimseRequestsAuth
from custos.wimse.http.message import HttpMessage
from custos.wimse.replay import MemoryReplayCache
from custos.wimse.verifier import build_request_verifier
from custos.wimse.wpt import WptVerifier, wpt_headers

CALLER = "spiffe://example.org/caller"
OTHER = "spiffe://example.org/other"
ORIGIN = "https://b.example"


def app_for(rig: Rig, **kw: Any) -> WimseASGIMiddleware:
    async def pay(request: Request) -> JSONResponse:
        return JSONResponse({"sub": str(request.state.wimse_caller.subject)})

    verifier = build_request_verifier(rig.authority.bundle, [ORIGIN])
    return WimseASGIMiddleware(Starlette(routes=[Route("/pay", pay, methods=["POST"])]),
                               verifier, **kw)


def test_signed_responses_with_the_agent_signing_on_both_sides(wapi: Rig) -> None:
    wapi.publish(wapi.serve("e1", CALLER, custody="memory"))
    with SyncWorkloadClient(f"unix://{wapi.socket}") as agent:
        # workload-b signs its answer through the agent, workload-a checks it.
        app = app_for(wapi, response_signer=agent.signer())
        auth = WimseAuth(agent.signer(sign_response=True), variant="http-signature",
                         response_verifier=wapi.authority.bundle,
                         require_signed_response=True, expected_responder=CALLER)
        with TestClient(app, base_url=ORIGIN) as http:
            ok = http.post("/pay", content=b"{}", auth=auth)
            assert ok.status_code == 200 and ok.headers["signature-input"]
        # The agent refuses workload-b's signature (an identity it does not have):
        # no unsigned answer leaves, a 500 problem instead of a traceback.
        refusing = app_for(wapi, response_signer=agent.signer(spiffe_id=OTHER))
        signed = agent.sign_http_request(HttpMessage.request("POST", "/pay", [], b"{}"),
                                         f"{ORIGIN}/pay", sign_response=True)
        with TestClient(refusing, base_url=ORIGIN) as http:
            refused = http.post("/pay", content=b"{}", headers=list(signed.headers))
        assert refused.status_code == 500 and "signature-input" not in refused.headers
        assert refused.json()["code"] == "response_signing_failed", refused.text


@pytest.mark.parametrize("variant", ["wpt", "http-signature"])
def test_httpx_with_the_agent_as_signer_reaches_the_app_as_the_caller(
    wapi: Rig, variant: str
) -> None:
    wapi.publish(wapi.serve("e1", CALLER, custody="memory"))
    seen: list[httpx.Request] = []
    with SyncWorkloadClient(f"unix://{wapi.socket}") as agent:
        auth = WimseAuth(agent.signer(), variant=variant)  # type: ignore[arg-type]
        with TestClient(app_for(wapi), base_url=ORIGIN) as http:
            http.event_hooks["request"].append(seen.append)
            ok = http.post("/pay", content=b"{}", auth=auth)
            assert ok.status_code == 200, ok.text
            assert ok.json() == {"sub": CALLER}
            # The very same request again: its proof is spent.
            sent = seen[-1]
            replay = http.post("/pay", content=b"{}", headers=dict(sent.headers))
            expected = (401, "wpt_replayed") if variant == "wpt" else (400, "replayed_proof")
            assert (replay.status_code, replay.json()["code"]) == expected


def test_an_async_httpx_client_signs_through_the_agent_off_its_loop(wapi: Rig) -> None:
    wapi.publish(wapi.serve("e1", CALLER, custody="memory"))
    signer = AgentProofSigner(SyncWorkloadClient(f"unix://{wapi.socket}"))

    async def main() -> httpx.Response:
        transport = httpx.ASGITransport(app=app_for(wapi))
        async with httpx.AsyncClient(transport=transport, base_url=ORIGIN) as http:
            # WimseAuth's async flow calls the (blocking) signer in a worker thread.
            answers = await asyncio.gather(*(
                http.post("/pay", content=b"{}", auth=WimseAuth(signer)) for _ in range(4)))
        assert [a.status_code for a in answers] == [200] * 4
        return answers[0]

    assert asyncio.run(main()).json() == {"sub": CALLER}
    signer.client.close()


def test_requests_auth_with_the_agent_as_signer(wapi: Rig) -> None:
    wapi.publish(wapi.serve("e1", CALLER, custody="memory"))
    signer = AgentProofSigner(SyncWorkloadClient(f"unix://{wapi.socket}"), wpt_ttl=30)
    prepared = requests.Request("POST", f"{ORIGIN}/pay", data=b"{}").prepare()
    prepared = WimseRequestsAuth(signer)(prepared)
    headers = list(prepared.headers.items())
    verifier = WptVerifier(wapi.authority.bundle, audiences=[ORIGIN],
                           replay=MemoryReplayCache())
    caller = verifier.verify(HttpMessage.request("POST", "/pay", headers, b"{}"))
    assert str(caller.subject) == CALLER
    signer.client.close()


# -- the CLI, in a child process, against the same socket --------------------------------


def cli(rig: Rig, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    done = run_custos(*args, extra_env={"SPIFFE_ENDPOINT_SOCKET": f"unix://{rig.socket}",
                                        **(env or {})})
    return done.returncode, done.stdout, done.stderr


def test_cli_wit_fetch_and_wpt_sign_headers_from_one_call(wapi: Rig) -> None:
    identity = wapi.serve("e1", CALLER, custody="memory")
    wapi.publish(identity)
    code, out, err = cli(wapi, "wit", "fetch")
    assert (code, out.strip()) == (0, identity.wit), err
    code, out, err = cli(wapi, "wpt", "sign", "--audience", f"{ORIGIN}/pay", "--headers")
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == ["Workload-Identity-Token",
                                                         "Authorization"]
    fields = [tuple(line.split(": ", 1)) for line in lines]
    verifier = WptVerifier(wapi.authority.bundle, audiences=[ORIGIN],
                           replay=MemoryReplayCache())
    caller = verifier.verify(HttpMessage.request("GET", "/pay", fields))  # type: ignore[arg-type]
    assert str(caller.subject) == CALLER
    code, out, err = cli(wapi, "wpt", "sign", "--audience", f"{ORIGIN}/pay")
    assert code == 0 and out.count(".") == 2 and ":" not in out
    verifier.verify(HttpMessage.request("GET", "/pay", wpt_headers(identity.wit, out.strip())))


def test_cli_jwt_fetch_and_healthcheck(wapi: Rig) -> None:
    wapi.publish(wapi.serve("e1", CALLER, custody="memory"))
    code, out, err = cli(wapi, "jwt", "fetch", "--audience", ORIGIN)
    assert code == 0, err
    with SyncWorkloadClient(f"unix://{wapi.socket}") as client:
        assert str(client.validate_jwt_svid(out.strip(), ORIGIN).spiffe_id) == CALLER
    code, out, err = cli(wapi, "agent", "healthcheck", "--socket", f"unix://{wapi.socket}")
    assert (code, out.strip()) == (0, "Agent is healthy.")


def test_cli_x509_fetch_writes_chain_key_0600_and_bundle(wapi: Rig, tmp_path: Path) -> None:
    wapi.publish(wapi.serve("e1", CALLER, custody="exportable"))
    out_dir = tmp_path / "svid"
    code, _, err = cli(wapi, "x509", "fetch", "--out", str(out_dir))
    assert code == 0, err
    chain = x509.load_pem_x509_certificates((out_dir / "svid.pem").read_bytes())
    key = load_pem_private_key((out_dir / "svid.key").read_bytes(), None)
    bundle = x509.load_pem_x509_certificates((out_dir / "bundle.pem").read_bytes())
    assert stat.S_IMODE((out_dir / "svid.key").stat().st_mode) == 0o600
    assert key.public_key() == chain[0].public_key()
    assert tuple(bundle) == wapi.authority.bundle.x509_authorities
    assert sorted(os.listdir(out_dir)) == ["bundle.pem", "svid.key", "svid.pem"]


def test_cli_errors_are_one_line(wapi: Rig, tmp_path: Path) -> None:
    wapi.publish(wapi.serve("e1", CALLER, custody="memory"))
    # Device-held: no key to write; the line names the call to use instead.
    code, _, err = cli(wapi, "x509", "fetch", "--out", str(tmp_path / "x"))
    assert code == 1 and err.startswith("error [workload_api_not_exportable]:")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    code, _, err = cli(wapi, "agent", "healthcheck", "--socket",
                       f"unix://{tmp_path}/none.sock")
    assert code == 1 and err.startswith("error [workload_api_unavailable]:")
    assert len(err.strip().splitlines()) == 1
    code, _, err = cli(wapi, "wit", "fetch", "--socket", "tcp://127.0.0.1:1")
    assert code == 1 and err.startswith("error [workload_endpoint_invalid]:")
    code, _, err = cli(wapi, "wit", "fetch", "--spiffe-id", "spiffe://example.org/other")
    assert code == 1 and err.startswith("error [workload_api_permission_denied]:")
    code, _, err = cli(wapi, "wpt", "sign", "--audience", ORIGIN, "--ttl", "999")
    assert code == 1 and err.startswith("error [") and len(err.strip().splitlines()) == 1
