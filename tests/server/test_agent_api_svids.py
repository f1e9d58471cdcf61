"""The ``custos.agent.v1.Svids`` service end to end: the agent's client library
(:class:`custos.agent.client.calls.AgentApiClient`) against a real server over TLS,
on SQLite and PostgreSQL. Refusals per item and per call first, then issuance."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding
from grpclib.client import Channel
from grpclib.const import Status
from joserfc.jwk import ECKey

from custos._proto import agent_v1_pb2, agent_v1_pb2_grpc
from custos.agent.client.attest import AgentIdentity, InvalidServerResponseError
from custos.agent.client.calls import AgentApiClient, IssuedX509, WitParams, X509Params
from custos.agent.client.channel import LimitedCodec
from custos.agent.client.errors import AgentApiError
from custos.agent.residency import CertifyEvidence
from custos.bundle import BundleSet, TrustBundle
from custos.errors import CustosError
from custos.identity import SpiffeId, TrustDomain
from custos.jwtsvid import validate_jwt_svid
from custos.keys import KeyStore, KeyStoreConfig, open_key_store
from custos.keys.jwk import public_jwk_members
from custos.server.agent_api.status import detail_for, status_for
from custos.server.datastore import DatastoreUnavailableError, NotFoundError
from custos.server.issuer import MAX_BATCH, NotEntitledError
from custos.testing.server import ServerRig
from custos.wimse.errors import WptReplayError
from custos.wimse.wit import mint_wit, verify_wit
from custos.x509 import verify_x509_svid

from .test_agent_api_auth import TD, Harness, agent_keys, serve, server_rig
from .test_issuer import break_audit_writes, csr_for


@pytest.fixture
def rig(store_url: str) -> Iterator[ServerRig]:
    yield from server_rig(store_url)


@pytest.fixture
def keys() -> Iterator[KeyStore]:
    yield from agent_keys()


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def error_code(item: IssuedX509) -> str | None:
    return None if item.error is None else item.error.code


def test_x509_batch_refuses_items_alone_and_issues_the_rest(rig: ServerRig, keys: KeyStore) -> None:
    async def scenario(h: Harness) -> None:
        agent = h.make_agent("n1")
        other = h.make_agent("n2")
        web = h.entry(agent, "/web", dns_names=["web.example.org"], key_custody="tpm")
        theirs = h.entry(other, "/theirs")
        key = ec_key()
        requests = [
            X509Params(web, csr_for(key), "tpm", CertifyEvidence(b"\x01certify", b"\x02sig", b"")),
            X509Params(theirs, csr_for(ec_key()), "memory"),
            X509Params(web, csr_for(ec_key()), "memory"),
            X509Params(web, b"garbage", "tpm"),
        ]

        results = await agent.new_x509_svids(requests)

        assert [error_code(r) for r in results] == [
            None,
            "not_entitled",
            "custody_mismatch",
            "invalid_csr",
        ]
        assert all(r.error.status is Status.OK for r in results[1:])  # type: ignore[union-attr]
        assert results[1].cert_chain == () and results[1].expires_at == 0
        chain = results[0].cert_chain
        bundles = BundleSet([h.srv.ctx.bundle()])
        assert str(verify_x509_svid(chain, bundles)) == f"spiffe://{TD}/web"
        assert results[0].expires_at == int(chain[0].not_valid_after_utc.timestamp())
        sans = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.DNSName) == ["web.example.org"]
        row = h.datastore.audit.since()[-1]
        assert (row.event, row.who, row.custody) == (
            "x509-svid",
            str(agent.identity.spiffe_id),
            "tpm",
        )
        assert row.evidence == "AWNlcnRpZnk=.AnNpZw=="
        assert row.residency == "unproven"  # recorded; this agent has no attestation key

    serve(rig, keys, scenario)


def test_a_batch_over_the_cap_is_invalid_argument(rig: ServerRig, keys: KeyStore) -> None:
    async def scenario(h: Harness) -> None:
        agent = h.make_agent("n1")
        web = h.entry(agent, "/web")
        csr = csr_for(ec_key())
        with pytest.raises(AgentApiError) as info:
            await agent.new_x509_svids([X509Params(web, csr, "memory")] * (MAX_BATCH + 1))
        assert (info.value.status, info.value.code) == (
            Status.INVALID_ARGUMENT,
            "batch_too_large",
        )

    serve(rig, keys, scenario)


def test_wits_for_public_keys_only(rig: ServerRig, keys: KeyStore) -> None:
    async def scenario(h: Harness) -> None:
        agent = h.make_agent("n1")
        svc = h.entry(agent, "/svc")
        workload = h.key("workload")
        public = workload.public_jwk()
        private = {**public_jwk_members(ec_key().public_key()), "alg": "ES256", "d": "AAAA"}

        results = await agent.new_wits(
            [WitParams(svc, private, "memory"), WitParams(svc, public, "memory")]
        )

        assert results[0].error is not None and results[0].error.code == "private_key_sent"
        assert results[0].wit == ""
        wit = verify_wit(results[1].wit, h.srv.ctx.bundle(), profile="spiffe")
        assert str(wit.subject) == f"spiffe://{TD}/svc"
        assert wit.cnf_public_key == workload.public_key()
        assert results[1].expires_at == int(wit.expires_at)

    serve(rig, keys, scenario)


def test_jwt_svid_refusals_are_statuses(rig: ServerRig, keys: KeyStore) -> None:
    async def scenario(h: Harness) -> None:
        agent = h.make_agent("n1")
        other = h.make_agent("n2")
        svc = h.entry(agent, "/svc")
        theirs = h.entry(other, "/theirs")

        denied = await h.refused(agent.new_jwt_svid(theirs, ["rp"]))
        assert (denied.status, denied.code) == (Status.PERMISSION_DENIED, "not_entitled")
        bad = await h.refused(agent.new_jwt_svid(svc, ["a"] * 17))
        assert (bad.status, bad.code) == (Status.INVALID_ARGUMENT, "invalid_audience")

        issued = await agent.new_jwt_svid(svc, ["rp"])
        svid = validate_jwt_svid(issued.token, "rp", BundleSet([h.srv.ctx.bundle()]))
        assert str(svid.spiffe_id) == f"spiffe://{TD}/svc"
        assert issued.expires_at > time.time()

    serve(rig, keys, scenario)


def test_an_audit_store_that_is_down_is_unavailable_and_nothing_issued(
    rig: ServerRig, keys: KeyStore
) -> None:
    async def scenario(h: Harness) -> None:
        agent = h.make_agent("n1")
        svc = h.entry(agent, "/svc")
        before = len(h.datastore.audit.since())
        await asyncio.to_thread(break_audit_writes, rig.url)

        error = await h.refused(agent.new_jwt_svid(svc, ["rp"]))
        assert (error.status, error.code) == (Status.UNAVAILABLE, "datastore_unavailable")
        assert error.retryable
        results = await h.refused(
            agent.new_x509_svids([X509Params(svc, csr_for(ec_key()), "memory")])
        )
        assert results.status is Status.UNAVAILABLE
        assert len(h.datastore.audit.since()) == before

    serve(rig, keys, scenario)


def test_the_api_answers_refusals_in_one_line(rig: ServerRig, keys: KeyStore) -> None:
    async def scenario(h: Harness) -> None:
        agent = h.make_agent("n1")
        error = await h.refused(agent.new_jwt_svid("0" * 32, ["rp"]))
        assert error.status is Status.PERMISSION_DENIED
        assert "\n" not in error.message and error.code == "not_entitled"

    serve(rig, keys, scenario)


# -- the one status mapping ----------------------------------------------------------


def test_status_mapping(caplog: pytest.LogCaptureFixture) -> None:
    assert status_for(NotEntitledError("x")) is grpc.StatusCode.PERMISSION_DENIED
    assert status_for(WptReplayError("x")) is grpc.StatusCode.UNAUTHENTICATED
    assert status_for(DatastoreUnavailableError("x")) is grpc.StatusCode.UNAVAILABLE
    assert status_for(NotFoundError("x", code="entry_not_found")) is grpc.StatusCode.NOT_FOUND
    assert status_for(CustosError("x", code="agent_banned")) is grpc.StatusCode.PERMISSION_DENIED
    # Anything not ours is a bug: INTERNAL, and nothing of it on the wire.
    with caplog.at_level(logging.INFO):
        assert status_for(KeyError("secret-path")) is grpc.StatusCode.INTERNAL
        assert detail_for(KeyError("secret-path")) == "internal: internal error"
    assert status_for(CustosError("what")) is grpc.StatusCode.INTERNAL
    # An unmapped custos error keeps its code, never its message (it may hold internals).
    assert detail_for(CustosError("/etc/secret", code="attestor_failed")) == (
        "attestor_failed: internal error"
    )
    assert status_for(CustosError("x", code="attestation_timeout")) is (
        grpc.StatusCode.DEADLINE_EXCEEDED
    )
    assert detail_for(NotEntitledError("no\nsuch entry")) == "not_entitled: no such entry"


# -- the client checks what a server answers -------------------------------------------
# A custos server never answers like this; a server that does (a bug, or someone else
# answering on the address) must not hand the agent a certificate for another key.


class _WrongServer(agent_v1_pb2_grpc.SvidsServicer):
    def __init__(self, answer: Callable[[Any], Any]) -> None:
        self.answer = answer

    async def BatchNewX509SVID(self, request: Any, context: Any) -> Any:
        return self.answer(request)


def _client_against(answer: Callable[[Any], Any], scenario: Callable[[Any], Any]) -> None:
    async def main() -> None:
        server = grpc.aio.server()
        agent_v1_pb2_grpc.add_SvidsServicer_to_server(_WrongServer(answer), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        store = open_key_store(KeyStoreConfig(store="memory"))
        store.create("agent", "ES256")
        issuer_key = ECKey.import_key(ec.generate_private_key(ec.SECP256R1()))
        wit = mint_wit(
            issuer_key, alg="ES256", kid="k", subject=f"spiffe://{TD}/custos/agent/x",
            workload_public_jwk=store.get("agent"), ttl=600, profile="spiffe",
        )  # fmt: skip
        identity = AgentIdentity(
            spiffe_id=SpiffeId.parse(f"spiffe://{TD}/custos/agent/x"),
            x509_svid=(), wit=wit, bundle=TrustBundle(TrustDomain(TD)), selectors=(),
            expires_at=time.time() + 600, reattestable=False,
        )  # fmt: skip
        try:
            async with Channel("127.0.0.1", port, codec=LimitedCodec()) as channel:
                await scenario(AgentApiClient(channel, identity, store.get("agent")))
        finally:
            store.close()
            await server.stop(None)

    asyncio.run(main())


def _self_signed_der(key: Any) -> bytes:
    name = x509.Name([])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(hours=1))
        .sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256())
    )
    return cert.public_bytes(Encoding.DER)


#: The certified key of each wrong answer, when it is not the requested one: another
#: P-256 key, the same type on another curve, another type (the client compares keys).
_OTHER_KEYS: dict[str, Callable[[], Any]] = {
    "key": ec_key,
    "curve": lambda: ec.generate_private_key(ec.SECP384R1()),
    "type": ed25519.Ed25519PrivateKey.generate,
}


_HELD = [(w, False) for w in ["nothing", "count", "entry", "key", "curve", "type", "csr"]]
# The caller that holds the key passes it (X509Params.public_key): the same refusals.
_HELD += [(w, True) for w in ["nothing", "count", "entry", "key", "curve", "type"]]


@pytest.mark.parametrize(("wrong", "held"), _HELD)
def test_the_client_refuses_answers_that_do_not_fit_the_request(wrong: str, held: bool) -> None:
    requested = ec_key()

    def answer(request: Any) -> Any:
        entry_id = request.params[0].entry_id
        cert = _self_signed_der(_OTHER_KEYS.get(wrong, lambda: requested)())
        result = agent_v1_pb2.X509SVIDResult(
            entry_id="other" if wrong == "entry" else entry_id, x509_svid=cert, expires_at=1
        )
        results = [result, result] if wrong == "count" else [result]
        return agent_v1_pb2.BatchNewX509SVIDResponse(results=results)

    async def scenario(client: AgentApiClient) -> None:
        # An unreadable CSR: the server could not have certified its key.
        csr = b"\x30\x03garbage" if wrong == "csr" else csr_for(requested)
        public = requested.public_key() if held else None
        request = [X509Params("e1", csr, "memory", public_key=public)]
        if wrong == "nothing":
            [issued] = await client.new_x509_svids(request)
            assert issued.error is None and issued.cert_chain
            return
        with pytest.raises(InvalidServerResponseError):
            await client.new_x509_svids(request)

    _client_against(answer, scenario)
