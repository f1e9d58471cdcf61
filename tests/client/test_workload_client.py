"""custos.client against the agent's real Workload API server (grpclib, tmp Unix
socket, real attestation through a plugin catalog: tests/agent's rig)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from test_workload_api import Rig

from custos.bundle import BundleSet
from custos.client import (
    AgentProofSigner,
    InvalidRequestError,
    NotExportableError,
    SyncWorkloadClient,
    WorkloadApiDeniedError,
    WorkloadApiError,
    WorkloadApiUnavailableError,
    WorkloadClient,
    WorkloadEndpointError,
    parse_endpoint,
)
from custos.client.errors import error_from_status
from custos.errors import CustosError
from custos.wimse.http.message import HttpMessage
from custos.wimse.httpsig import HttpSignatureVerifier
from custos.wimse.replay import MemoryReplayCache
from custos.wimse.wit import WitVerifier
from custos.wimse.wpt import WptVerifier, wpt_headers

CALLER = "spiffe://example.org/caller"
OTHER = "spiffe://example.org/other"


def uri(rig: Rig) -> str:
    return f"unix://{rig.socket}"


@pytest.fixture
def device(wapi: Rig) -> Rig:
    """This process has one identity whose key stays in the agent (memory tier)."""
    wapi.publish(wapi.serve("e1", CALLER, custody="memory"))
    return wapi


def wpt_verifier(rig: Rig) -> WptVerifier:
    return WptVerifier(rig.authority.bundle, audiences=["https://b.example"],
                       replay=MemoryReplayCache())


# -- the calls ---------------------------------------------------------------------------


def test_sign_wpt_returns_the_wit_and_a_wpt_that_verifies(device: Rig) -> None:
    with SyncWorkloadClient(uri(device)) as client:
        signed = client.sign_wpt("https://b.example/pay?x=1", ttl=30, txn_token="txn")
        fetched = client.fetch_wit()
    wit, wpt = signed
    assert wit == fetched.wit and str(fetched.spiffe_id) == CALLER and fetched.expires_at > 0
    headers = [*wpt_headers(wit, wpt), ("Txn-Token", "txn")]
    caller = wpt_verifier(device).verify(HttpMessage.request("GET", "/pay", headers))
    assert str(caller.subject) == CALLER
    assert "eyJ" not in repr(fetched) and "eyJ" not in repr(signed)  # tokens stay out of logs


def test_the_asyncio_client_signs_requests_and_responses(device: Rig) -> None:
    body = b'{"amount": 5}'
    request = HttpMessage.request("POST", "/pay", [("Content-Type", "application/json")], body)

    async def main() -> tuple[HttpMessage, HttpMessage, object]:
        async with WorkloadClient(uri(device)) as client:
            signed = await client.sign_http_request(request, "https://b.example/pay",
                                                    sign_response=True)
            response = HttpMessage.response(200, [("Content-Type", "text/plain")], b"ok")
            answered = await client.sign_http_response(response, signed)
            chain = await client.fetch_x509_chain()
            return signed, answered, chain

    signed, answered, chain = asyncio.run(main())
    wits = WitVerifier(BundleSet([device.authority.bundle]))
    server_side = HttpSignatureVerifier(wits, MemoryReplayCache(), ["https://b.example"])
    assert str(server_side.verify_request(signed).subject) == CALLER
    client_side = HttpSignatureVerifier(wits, MemoryReplayCache(), ["https://b.example"])
    assert str(client_side.verify_response(answered, request=signed).subject) == CALLER
    assert str(chain.spiffe_id) == CALLER  # type: ignore[attr-defined]
    assert chain.cert_chain[0].public_key().public_bytes(  # type: ignore[attr-defined]
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo
    ) != b""
    assert chain.bundle == device.authority.bundle.x509_authorities  # type: ignore[attr-defined]


def test_jwt_svid_fetched_and_validated_by_the_agent(device: Rig) -> None:
    with SyncWorkloadClient(uri(device)) as client:
        svid = client.fetch_jwt_svid("https://b.example")
        checked = client.validate_jwt_svid(svid.token, "https://b.example")
        assert str(svid.spiffe_id) == CALLER and "eyJ" not in repr(svid)
        assert str(checked.spiffe_id) == CALLER
        assert checked.claims["aud"] in ("https://b.example", ["https://b.example"])
        with pytest.raises(WorkloadApiError) as e:
            client.validate_jwt_svid(svid.token, "https://elsewhere.example")
        assert e.value.status is grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.code.startswith("jwt")  # the agent's custos code, passed on


def test_exportable_x509_svids_come_with_their_key(wapi: Rig) -> None:
    wapi.publish(wapi.serve("e1", CALLER, custody="exportable"))
    with SyncWorkloadClient(uri(wapi)) as client:
        [svid] = client.fetch_x509_svids()
    spki = (Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert svid.private_key.public_key().public_bytes(*spki) == (
        svid.cert_chain[0].public_key().public_bytes(*spki)
    )
    assert "PRIVATE" not in repr(svid) and str(svid.spiffe_id) == CALLER

    async def aio() -> tuple[list[object], str]:
        async with WorkloadClient(uri(wapi)) as client:
            svids = await client.fetch_x509_svids()  # the first message of the stream
            jwt = await client.fetch_jwt_svid(["https://b.example", "https://c.example"])
            return list(svids), str((await client.validate_jwt_svid(
                jwt.token, "https://c.example")).spiffe_id)

    svids, subject = asyncio.run(aio())
    assert [str(s.spiffe_id) for s in svids] == [CALLER] and subject == CALLER  # type: ignore[attr-defined]


def test_device_held_keys_are_not_exportable(device: Rig) -> None:
    with SyncWorkloadClient(uri(device)) as client, pytest.raises(NotExportableError) as e:
        client.fetch_x509_svids()
    assert e.value.status is grpc.StatusCode.FAILED_PRECONDITION
    assert e.value.code == "workload_api_not_exportable" and "FetchX509Chain" in e.value.message


def test_another_workloads_identity_and_no_entry_are_denied(wapi: Rig) -> None:
    wapi.publish(wapi.serve("e1", CALLER, custody="memory"),
                 wapi.serve("e2", OTHER, custody="memory", selectors=["wapitest:uid:99999"]))
    with SyncWorkloadClient(uri(wapi)) as client:
        assert str(client.fetch_wit(CALLER).spiffe_id) == CALLER
        with pytest.raises(WorkloadApiDeniedError) as e:
            client.sign_wpt("https://b.example/", spiffe_id=OTHER)
        assert e.value.status is grpc.StatusCode.PERMISSION_DENIED
        wapi.publish()  # no entry for this process any more
        with pytest.raises(WorkloadApiDeniedError):
            client.fetch_wit()


def test_bad_input_is_refused_before_or_by_the_agent_with_a_code(device: Rig) -> None:
    with SyncWorkloadClient(uri(device)) as client:
        with pytest.raises(WorkloadApiError) as e:
            client.sign_wpt("")
        assert e.value.status is grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.code != "workload_api_invalid_argument"  # the agent's own code
        for bad in (0, 301, float("nan"), True):
            with pytest.raises(CustosError):
                client.sign_wpt("https://b.example/", ttl=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError):
            client.fetch_jwt_svid([])
        with pytest.raises(InvalidRequestError):
            client.fetch_wit(timeout=float("inf"))
        with pytest.raises(CustosError):
            client.fetch_wit("not-a-spiffe-id")
        with pytest.raises(InvalidRequestError):
            AgentProofSigner(client, signature_ttl=-1)
        # Wrong types from Python callers: refused here, not a TypeError from protobuf.
        for call in (lambda: client.sign_wpt(123),  # type: ignore[arg-type]
                     lambda: client.sign_wpt("https://b.example/",
                                             other_tokens={"x-a": 1}),  # type: ignore[dict-item]
                     lambda: client.fetch_wit(42),  # type: ignore[arg-type]
                     lambda: client.validate_jwt_svid(7, "x")):  # type: ignore[arg-type]
            with pytest.raises(InvalidRequestError):
                call()


# -- the socket --------------------------------------------------------------------------


@pytest.mark.parametrize("value, path", [
    ("unix:///run/custos/agent.sock", "/run/custos/agent.sock"),
    ("unix:/run/custos/agent.sock", "/run/custos/agent.sock"),
    ("unix:agent.sock", "agent.sock"),
    ("/run/custos/agent.sock", "/run/custos/agent.sock"),
    (Path("/run/x.sock"), "/run/x.sock"),
])
def test_socket_addresses(value: str, path: str) -> None:
    assert parse_endpoint(value).path == path
    assert parse_endpoint(parse_endpoint(value).uri).path == path


@pytest.mark.parametrize("value", [
    "tcp://127.0.0.1:8081", "unix://host/agent.sock", "unix:///a.sock?x=1", "unix:///a.sock#f",
    "unix:", "agent.sock", "http://x/", "unix:///" + "a" * 200, "unix:///a\x00b", "[::1",
])
def test_unusable_socket_addresses_are_one_clear_error(value: str) -> None:
    with pytest.raises(WorkloadEndpointError) as e:
        parse_endpoint(value)
    assert e.value.code == "workload_endpoint_invalid"


def test_the_socket_comes_from_spiffe_endpoint_socket(device: Rig,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPIFFE_ENDPOINT_SOCKET", raising=False)
    with pytest.raises(WorkloadEndpointError) as e:
        SyncWorkloadClient()
    assert e.value.code == "workload_endpoint_missing"
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", uri(device))
    with SyncWorkloadClient() as client:
        client.ping()
        assert str(client.endpoint) == uri(device)


def test_no_agent_is_unavailable_at_once_or_at_the_deadline(tmp_path: Path) -> None:
    missing = f"unix://{tmp_path}/none.sock"
    with SyncWorkloadClient(missing, wait_for_ready=False) as client:
        with pytest.raises(WorkloadApiUnavailableError) as e:
            client.ping()
        assert e.value.status is grpc.StatusCode.UNAVAILABLE and missing in e.value.message
    with SyncWorkloadClient(missing, timeout=0.2) as client:
        with pytest.raises(WorkloadApiUnavailableError) as e:
            client.ping()
        assert e.value.status is grpc.StatusCode.DEADLINE_EXCEEDED

    async def aio() -> WorkloadApiError:
        async with WorkloadClient(missing, wait_for_ready=False) as client:
            with pytest.raises(WorkloadApiUnavailableError) as e:
                await client.fetch_wit()
            return e.value

    assert asyncio.run(aio()).code == "workload_api_unavailable"


def test_one_sync_client_serves_many_threads(device: Rig) -> None:
    from concurrent.futures import ThreadPoolExecutor

    verifier = wpt_verifier(device)
    with SyncWorkloadClient(uri(device)) as client, ThreadPoolExecutor(8) as pool:
        pairs = list(pool.map(lambda n: client.sign_wpt(f"https://b.example/{n}"), range(32)))
    for n, (wit, wpt) in enumerate(pairs):
        verifier.verify(HttpMessage.request("GET", f"/{n}", wpt_headers(wit, wpt)))


def test_status_details_become_codes() -> None:
    e = error_from_status(grpc.StatusCode.INVALID_ARGUMENT, "wpt_bad_aud: no", "unix:///s")
    assert (e.code, e.message) == ("wpt_bad_aud", "no")
    e = error_from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "rate limit exceeded", "unix:///s")
    assert e.code == "workload_api_resource_exhausted" and type(e) is WorkloadApiError
    e = error_from_status(grpc.StatusCode.PERMISSION_DENIED, "no identity issued", "unix:///s")
    assert isinstance(e, WorkloadApiDeniedError) and e.code == "workload_api_permission_denied"
