"""custos.wimse.v1.WimseSigning over the socket, per custody tier with real
stores (memory; pkcs11 on SoftHSM; tpm on swtpm): what the agent signs, a
relying party's verifiers accept, and the key never leaves its store."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from test_workload_api import ME, Rig, _b64, make_rig, plugin_site, signing  # noqa: F401

from custos._proto import wimse_v1_pb2 as wpb
from custos.bundle import BundleSet
from custos.keys import KeyStore, KeyStoreConfig, open_key_store
from custos.wimse.http.message import HttpMessage
from custos.wimse.httpsig import HttpSignatureVerifier
from custos.wimse.replay import MemoryReplayCache
from custos.wimse.wit import WitVerifier
from custos.wimse.wpt import WptVerifier, wpt_headers

TIERS = ["memory", "pkcs11", "tpm"]


@pytest.fixture(params=TIERS)
def tier(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, KeyStore]]:
    kind: str = request.param
    if kind == "memory":
        config = KeyStoreConfig(store="memory")
    elif kind == "pkcs11":
        hsm = request.getfixturevalue("softhsm")
        config = KeyStoreConfig(store="pkcs11", pkcs11_module=hsm.module, pkcs11_uri=hsm.uri)
    else:
        tpm = request.getfixturevalue("swtpm")
        config = KeyStoreConfig(store="tpm", tcti=tpm.tcti, key_dir=tmp_path / "tpm-keys")
    store = open_key_store(config)
    try:
        yield kind, store
    finally:
        for info in store.list():
            store.delete(info.name)
        store.close()


@pytest.fixture
def served(plugin_site: Path, tmp_path: Path,  # noqa: F811
           tier: tuple[str, KeyStore]) -> Iterator[tuple[Rig, object]]:
    kind, store = tier
    with make_rig(tmp_path) as rig:
        identity = rig.authority.identity(store, "e1", "spiffe://example.org/caller", kind, [ME])
        rig.publish(identity)
        yield rig, identity


def test_a_wpt_signed_by_the_agent_verifies_and_matches_the_wit_returned(
    served: tuple[Rig, object],
) -> None:
    rig, identity = served
    reply = signing(rig, lambda s: s.SignWPT(wpb.SignWPTRequest(
        audience="https://b.example/pay?x=1", txn_token="txn", ttl_seconds=30)))
    assert reply.wit == identity.wit  # type: ignore[attr-defined]
    verifier = WptVerifier(rig.authority.bundle, audiences=["https://b.example"],
                           replay=MemoryReplayCache())
    headers = [*wpt_headers(reply.wit, reply.wpt), ("Txn-Token", "txn")]
    caller = verifier.verify(HttpMessage.request("POST", "/pay?x=1", headers))
    assert str(caller.subject) == "spiffe://example.org/caller"


def test_an_http_request_and_its_response_signed_by_the_agent_verify(
    served: tuple[Rig, object],
) -> None:
    rig, _ = served
    body = b'{"amount": 5}'
    request = wpb.HttpRequest(method="POST", target="/pay", body=body,
                              headers=[wpb.HttpField(name="Content-Type",
                                                     value="application/json")])
    signed = signing(rig, lambda s: s.SignHttpRequest(wpb.SignHttpRequestRequest(
        request=request, audience="https://b.example/pay", sign_response=True)))
    message = HttpMessage.request("POST", "/pay", [(f.name, f.value) for f in signed.headers],
                                  body)
    wit_verifier = WitVerifier(BundleSet([rig.authority.bundle]))
    verifier = HttpSignatureVerifier(wit_verifier, MemoryReplayCache(), ["https://b.example"])
    checked = verifier.verify_request(message)
    assert str(checked.subject) == "spiffe://example.org/caller"
    # The same workload signs its answer for that request.
    answered = signing(rig, lambda s: s.SignHttpResponse(wpb.SignHttpResponseRequest(
        status=200, body=b"ok", request=wpb.HttpRequest(
            method="POST", target="/pay", body=body, headers=signed.headers))))
    response = HttpMessage.response(200, [(f.name, f.value) for f in answered.headers], b"ok")
    client_side = HttpSignatureVerifier(wit_verifier, MemoryReplayCache(), ["https://b.example"])
    assert str(client_side.verify_response(response, request=message).subject) == (
        "spiffe://example.org/caller"
    )


def test_fetch_wit_gives_the_token_and_never_a_key(served: tuple[Rig, object]) -> None:
    rig, identity = served
    reply = signing(rig, lambda s: s.FetchWIT(wpb.FetchWITRequest()))
    assert reply.wit == identity.wit and reply.expires_at > 0  # type: ignore[attr-defined]
    # The key calls of the SPIFFE API refuse a device-held identity (decision 2).
    from test_workload_api import WIT, first

    from custos._proto import workload_pb2 as pb

    with pytest.raises(GRPCError) as e:
        first(rig, WIT, pb.WITSVIDRequest(), pb.WITSVIDResponse)
    assert e.value.status is Status.FAILED_PRECONDITION


def test_concurrent_signers_all_get_good_proofs(served: tuple[Rig, object]) -> None:
    rig, identity = served

    async def many() -> list[wpb.SignWPTResponse]:
        from grpclib.client import Channel

        from custos._proto.wimse_v1_grpc import WimseSigningStub

        channel = Channel(path=str(rig.socket))
        try:
            stub = WimseSigningStub(channel)
            replies = await asyncio.gather(*(
                stub.SignWPT(wpb.SignWPTRequest(audience=f"https://b.example/{n}"))
                for n in range(16)
            ))
            return list(replies)
        finally:
            channel.close()

    verifier = WptVerifier(rig.authority.bundle, audiences=["https://b.example"],
                           replay=MemoryReplayCache())
    replies = asyncio.run(many())
    for n, reply in enumerate(replies):
        assert reply.wit == identity.wit  # type: ignore[attr-defined]
        verifier.verify(HttpMessage.request("GET", f"/{n}", wpt_headers(reply.wit, reply.wpt)))
    assert len({r.wpt for r in replies}) == 16
