"""An X.509-SVID batch's proof is spent in the batch's own unit of work (decision 0128):
checked before anything is signed, written with the audit rows it authorised. These
show the attacks that still fail: the same proof sent twice, a proof whose batch was
refused item by item, two calls racing with one proof, and a call that dies before its
unit commits. Through the real Agent API (grpcio, TLS) and on the datastore directly,
on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from custos._proto import agent_v1_pb2, agent_v1_pb2_grpc, types_v1_pb2
from custos.identity import Selector, SpiffeId
from custos.keys import KeyStore, KeyStoreConfig, open_key_store
from custos.server.datastore import Datastore
from custos.server.issuer import CustodyEvidence
from custos.testing.server import ServerRig, running_server
from custos.wimse.errors import ReplayError
from custos.wimse.wpt import create_wpt

TD = "example.org"
SVIDS = "custos.agent.v1.Svids"
NODE = (Selector("node", "n1"),)


@pytest.fixture
def rig(store_url: str) -> Iterator[ServerRig]:
    rig = ServerRig.create(datastore_url=store_url)
    yield rig
    rig.destroy()


@pytest.fixture
def keys() -> Iterator[KeyStore]:
    store = open_key_store(KeyStoreConfig(store="memory"))
    yield store
    store.close()


def _csr(key: ec.EllipticCurvePrivateKey | object) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    return builder.sign(key, hashes.SHA256()).public_bytes(Encoding.DER)  # type: ignore[arg-type]


def _batch_call(rig: ServerRig, keys: KeyStore, sends: int, *, entry: str = "real") -> list[object]:
    """An agent made as node attestation leaves it, one BatchNewX509SVID proof sent
    ``sends`` times; each answer, or the AioRpcError that refused it. ``entry``
    "unknown" asks for an entry the agent does not have (every item refused)."""

    async def main() -> list[object]:
        async with running_server(rig) as srv:
            ctx = srv.ctx
            keys.create("agent", "ES256")
            agent_key = keys.get("agent")
            agent_id = SpiffeId.parse(f"spiffe://{TD}/custos/agent/test/n1")
            creds = ctx.issuer.agent_credentials(
                agent_id,
                _csr(agent_key.private_key()),
                CustodyEvidence("memory"),
                attestor="test",
                selectors=NODE,
            )
            ctx.datastore.agents.attested(
                agent_id,
                attestor="test",
                selectors=NODE,
                serial=format(creds.x509_svid.leaf.serial_number, "x"),
                expires_at=creds.not_after,
            )
            workload = ctx.datastore.entries.create(
                f"spiffe://{TD}/svc", agent_id, ["unix:uid:1000"]
            )
            entry_id = workload.id if entry == "real" else "no-such-entry"
            audience = f"spiffe://{TD}/custos/server/{SVIDS}/BatchNewX509SVID"
            metadata = (
                ("workload-identity-token", creds.wit),
                ("workload-proof-token", create_wpt(agent_key, creds.wit, audience)),
            )
            roots = b"".join(c.public_bytes(Encoding.PEM) for c in ctx.bundle().x509_authorities)
            channel = grpc.aio.secure_channel(
                srv.agent_api_address,
                grpc.ssl_channel_credentials(root_certificates=roots),
                options=[("grpc.ssl_target_name_override", ctx.config.agent_api.dns_name)],
            )
            request = agent_v1_pb2.BatchNewX509SVIDRequest(
                params=[
                    agent_v1_pb2.X509SVIDParams(
                        entry_id=entry_id,
                        csr=_csr(ec.generate_private_key(ec.SECP256R1())),
                        custody=types_v1_pb2.KeyCustody(tier="memory"),
                    )
                ]
            )
            stub = agent_v1_pb2_grpc.SvidsStub(channel)  # type: ignore[no-untyped-call]
            answers: list[object] = []
            try:
                for _ in range(sends):
                    try:
                        answers.append(
                            await stub.BatchNewX509SVID(request, metadata=metadata, timeout=30)
                        )
                    except grpc.aio.AioRpcError as e:
                        answers.append(e)
                answers.append(
                    [
                        r.identity
                        for r in ctx.datastore.audit.since()
                        if r.event == "x509-svid" and r.identity.endswith("/svc")
                    ]
                )
            finally:
                await channel.close()
            return answers

    return asyncio.run(main())


def test_the_same_batch_proof_twice_is_refused_and_issues_nothing(
    rig: ServerRig, keys: KeyStore
) -> None:
    first, second, audited = _batch_call(rig, keys, 2)
    assert isinstance(first, agent_v1_pb2.BatchNewX509SVIDResponse)
    assert first.results[0].x509_svid and not first.results[0].HasField("error")
    assert isinstance(second, grpc.aio.AioRpcError)
    assert second.code() == grpc.StatusCode.UNAUTHENTICATED
    # One certificate for the workload, from the first call: the replay wrote nothing.
    assert audited == [f"spiffe://{TD}/svc"]


def test_a_batch_refused_item_by_item_still_spends_its_proof(
    rig: ServerRig, keys: KeyStore
) -> None:
    first, second, _ = _batch_call(rig, keys, 2, entry="unknown")
    assert isinstance(first, agent_v1_pb2.BatchNewX509SVIDResponse)
    assert first.results[0].HasField("error")
    assert first.results[0].error.code == "not_entitled"
    assert isinstance(second, grpc.aio.AioRpcError)
    assert second.code() == grpc.StatusCode.UNAUTHENTICATED


# -- the deferred write on the datastore ----------------------------------------------


def _audit(store: Datastore, identity: str) -> None:
    store.audit.record(
        who=f"spiffe://{TD}/custos/agent/test/n1",
        attestor="test",
        selectors=(),
        identity=identity,
        serial_or_jti="01",
        not_after=time.time() + 60,
        event="x509-svid",
    )


def test_deferred_proof_is_written_only_with_its_unit(store: Datastore) -> None:
    with store.deferring_writes() as deferred:
        assert store.replay.check_and_store("wpt:a", "jti-1", time.time() + 60)
    # Not run: the call ended before its unit of work (nothing issued), nothing stored.
    with store.deferring_writes() as again:
        assert store.replay.check_and_store("wpt:a", "jti-1", time.time() + 60)
    with store.unit_of_work():
        again.run()
    assert not store.replay.check_and_store("wpt:a", "jti-1", time.time() + 60)
    assert deferred.writes  # the first call's write was collected, never made


def test_a_stored_proof_is_refused_before_anything_is_deferred(store: Datastore) -> None:
    assert store.replay.check_and_store("wpt:a", "jti-1", time.time() + 60)
    with store.deferring_writes() as deferred:
        assert not store.replay.check_and_store("wpt:a", "jti-1", time.time() + 60)
    assert not deferred.writes


def test_two_calls_racing_with_one_proof_one_unit_rolls_back_whole(
    store: Datastore, store_url: str
) -> None:
    """Both pass the early read; the first unit commits; the second's insert then
    meets the row and its whole unit — here an audit row — rolls back."""
    with Datastore.open(store_url, trust_domain=TD) as other:
        with store.deferring_writes() as mine:
            assert store.replay.check_and_store("wpt:a", "jti-race", time.time() + 60)
        with other.deferring_writes() as theirs:
            assert other.replay.check_and_store("wpt:a", "jti-race", time.time() + 60)
        with store.unit_of_work():
            _audit(store, "winner")
            mine.run()
        with pytest.raises(ReplayError), other.unit_of_work():
            _audit(other, "loser")
            theirs.run()
    identities = [r.identity for r in store.audit.since()]
    assert identities == ["winner"]


def test_concurrent_deferred_units_exactly_one_commits(store: Datastore) -> None:
    barrier = threading.Barrier(4)
    outcomes: list[str] = []
    lock = threading.Lock()

    def call(i: int) -> None:
        with store.deferring_writes() as deferred:
            ok = store.replay.check_and_store("wpt:a", "jti-threads", time.time() + 60)
        barrier.wait()
        try:
            with store.unit_of_work():
                _audit(store, f"call-{i}")
                deferred.run()
            outcome = "committed" if ok else "refused-early"
        except ReplayError:
            outcome = "rolled-back"
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("committed") == 1
    assert len(store.audit.since()) == 1


def test_an_expired_proof_time_is_not_deferred(store: Datastore) -> None:
    with store.deferring_writes() as deferred:
        assert store.replay.check_and_store("ns", "v", 1010.0, now=1020.0)
    assert not deferred.writes
