"""Node attestation through the Agent API (``AttestAgent``, ``RenewAgent``), driven by
the attestation client library against a real server (``custos.testing.server``).

Besides ``join_token`` the server runs two test attestors installed as a third
party's would be (a ``.dist-info`` on sys.path): ``acme_challenge`` (one challenge
round, re-attestable) and ``acme_once`` (the same, not re-attestable); both name the
agent after the payload, so one node can attest twice under one ID.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID
from grpclib.client import Channel
from grpclib.const import Status

from common.grpcio_channel import grpcio_channel, status_of
from custos._proto import agent_v1_grpc, agent_v1_pb2, agent_v1_pb2_grpc, types_v1_pb2
from custos.agent.client.attest import (
    AgentIdentity,
    attest_agent,
    der_chain,
    make_csr,
    renew_agent,
)
from custos.agent.client.channel import open_channel, open_insecure_bootstrap_channel
from custos.agent.client.errors import AgentApiError, run_call
from custos.agent.residency import KeyResidency
from custos.bundle import TrustBundle
from custos.errors import CustosError
from custos.identity import SpiffeId
from custos.keys import KeyStore, KeyStoreConfig, StoreKey, open_key_store
from custos.plugin import AgentCatalog, PluginConfig
from custos.server.app import Server
from custos.testing.server import ServerRig, running_server

from .test_issuer import break_writes

TD = "example.org"
T = TypeVar("T")

ACME_MODULE = """
import asyncio
import threading

from custos.errors import CustosError
from custos.plugin.protocols import AttestedNode, Challenge


#: Set while an agent half configured with "hang" waits for ever after a challenge.
HANGING = threading.Event()


class AcmeRefused(CustosError):
    code = "acme_refused"


def node_name(payload):
    try:
        name = payload.decode("ascii")
    except UnicodeDecodeError:
        raise AcmeRefused("the payload is not a node name") from None
    if not name.isalnum() or len(name) > 64:
        raise AcmeRefused("the payload is not a node name")
    return name


class ChallengeServer:
    reattestable = True

    @property
    def supports_reattestation(self):
        return self.reattestable

    def configure(self, config, core):
        pass

    def close(self):
        pass

    async def attest(self, payload):
        name = node_name(payload)
        answer = yield Challenge(b"nonce:" + payload)
        if answer != b"nonce:" + payload + b":answer":
            raise AcmeRefused("wrong answer")
        yield AttestedNode(agent_path=[name], selectors=["node:" + name])


class OnceServer(ChallengeServer):
    reattestable = False


class ChallengeAgent:
    def configure(self, config, core):
        self.name = config["name"]
        self.hang = config.get("hang", False)

    def close(self):
        pass

    async def attestation_flow(self):
        challenge = yield self.name.encode()
        if self.hang:  # a client that stops answering
            HANGING.set()
            await asyncio.Event().wait()
        yield challenge + b":answer"
"""

ACME_ENTRY_POINTS = """
[custos.server.node_attestors]
acme_challenge = acme_attest:ChallengeServer
acme_once = acme_attest:OnceServer

[custos.agent.node_attestors]
acme_challenge = acme_attest:ChallengeAgent
acme_once = acme_attest:ChallengeAgent
"""

ACME_SECTIONS: dict[str, Mapping[str, object]] = {
    "node_attestors.acme_challenge": {},
    "node_attestors.acme_once": {},
}


def install_acme(root: Path) -> None:
    """The test attestors as an installed distribution (entry points and module)."""
    info = root / "acme_attest-1.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-attest\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(ACME_ENTRY_POINTS)
    (root / "acme_attest.py").write_text(ACME_MODULE)
    importlib.invalidate_caches()


@pytest.fixture
def acme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    install_acme(site)
    monkeypatch.syspath_prepend(str(site))


@pytest.fixture
def rig(acme: None) -> Iterator[ServerRig]:
    rig = ServerRig.create(sections=ACME_SECTIONS)
    yield rig
    rig.destroy()


@pytest.fixture
def keys() -> Iterator[KeyStore]:
    store = open_key_store(KeyStoreConfig(store="memory"))
    yield store
    store.close()


@dataclass
class Harness:
    """One running server and what a test agent needs to talk to it."""

    srv: Server
    keys: KeyStore
    bundle: TrustBundle | None = None

    @property
    def datastore(self) -> Any:
        return self.srv.ctx.datastore

    def channel(self) -> Channel:
        # The bundle as the agent has it: read once (a test may stop the database).
        if self.bundle is None:
            self.bundle = self.srv.ctx.bundle()
        return open_channel(
            self.srv.agent_api_address,
            bundle=self.bundle,
            server_name=self.srv.ctx.config.agent_api.dns_name,
        )

    def raw_channel(self) -> grpc.aio.Channel:
        """A grpcio channel for :func:`raw_attest` (same roots and name)."""
        if self.bundle is None:
            self.bundle = self.srv.ctx.bundle()
        return grpcio_channel(
            self.srv.agent_api_address,
            bundle=self.bundle,
            server_name=self.srv.ctx.config.agent_api.dns_name,
        )

    def key(self, name: str, alg: str = "ES256") -> StoreKey:
        self.keys.create(name, alg)
        return self.keys.get(name)

    async def token(self, ttl: float = 600, *, now: float | None = None) -> tuple[str, str]:
        """A join token: (its id, its secret)."""
        token, secret = await asyncio.to_thread(self.datastore.join_tokens.create, ttl, now=now)
        return token.id, secret

    async def attest(
        self,
        attestor: str,
        settings: Mapping[str, object],
        key: StoreKey,
        *,
        custody: str = "memory",
        attestor_name: str | None = None,
    ) -> AgentIdentity:
        """The agent side: its catalog's node attestor and the client library."""
        with AgentCatalog.load(
            TD,
            node_attestors=[PluginConfig(attestor, dict(settings))],
            workload_attestors=[PluginConfig("example")],
        ) as catalog:
            async with self.channel() as channel:
                return await attest_agent(
                    channel,
                    attestor=catalog.node_attestor,
                    key=key,
                    custody=custody,
                    attestor_name=attestor_name,
                )

    async def refused(self, attempt: Awaitable[object]) -> AgentApiError:
        with pytest.raises(AgentApiError) as info:
            await attempt
        return info.value

    def attestations(self, outcome: str, attestor: str) -> float:
        value = self.srv.ctx.metrics.registry.get_sample_value(
            "custos_server_attestations_total", {"attestor": attestor, "outcome": outcome}
        )
        return value or 0.0


def serve(rig: ServerRig, keys: KeyStore, scenario: Callable[[Harness], Awaitable[T]]) -> T:
    async def main() -> T:
        async with running_server(rig) as srv:
            return await scenario(Harness(srv, keys))

    return asyncio.run(main())


def spki(key: object) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)  # type: ignore[attr-defined,no-any-return]


def join_token(secret: str) -> dict[str, object]:
    return {"token": secret}


# -- join_token, the happy path first so the refusals below mean something ----------


def test_a_join_token_attests_the_agent_with_its_own_key(rig: ServerRig, keys: KeyStore) -> None:
    async def scenario(h: Harness) -> None:
        token_id, secret = await h.token()
        key = h.key("agent")
        identity = await h.attest("join_token", join_token(secret), key)

        assert identity.spiffe_id == SpiffeId.parse(
            f"spiffe://{TD}/custos/agent/join_token/{token_id}"
        )
        assert spki(identity.x509_svid[0].public_key()) == spki(key.public_key())
        assert identity.bundle.trust_domain == identity.spiffe_id.trust_domain
        assert identity.wit and identity.expires_at > time.time()
        assert identity.selectors == () and identity.reattestable is False
        agent = h.datastore.agents.get(identity.spiffe_id)
        assert agent.attestor == "join_token"
        assert agent.serial == format(identity.x509_svid[0].serial_number, "x")
        assert not agent.evicted and not agent.banned
        events = [r for r in h.datastore.audit.since(0) if r.identity == str(identity.spiffe_id)]
        assert sorted(r.event for r in events) == ["attestation", "wit", "x509-svid"]
        [attested] = [r for r in events if r.event == "attestation"]
        assert attested.attestor == "join_token" and attested.custody == "memory"
        assert attested.serial_or_jti == agent.serial
        assert h.attestations("ok", "join_token") == 1

    serve(rig, keys, scenario)


class _JoinToken:
    """The join_token agent half, without a catalog per token."""

    name = "join_token"

    def __init__(self, secret: str) -> None:
        self._payload = token_payload(secret)

    async def attest(self, exchange: Callable[[bytes], Awaitable[bytes | None]]) -> None:
        assert await exchange(self._payload) is None


def test_many_concurrent_attestations_all_get_their_identity(
    rig: ServerRig, keys: KeyStore
) -> None:
    """grpclib (the agent's client) drops a result it has received but not handed out
    when the server resets the stream (grpclib #52), which an HTTP/2 server does when
    it ends a call its client has not half-closed: 1-10 % of attestations lost their
    result and burnt their join token.  The agent half-closes after the result and
    the server waits for that before it ends the call (decision 0126)."""
    count, at_once = 200, 8

    async def scenario(h: Harness) -> None:
        secrets = [(await h.token())[1] for _ in range(count)]
        gate = asyncio.Semaphore(at_once)

        async def one(i: int, channel: Channel) -> AgentIdentity:
            async with gate:
                return await attest_agent(
                    channel,
                    attestor=_JoinToken(secrets[i]),  # type: ignore[arg-type]
                    key=h.key(f"many-{i}"),
                    custody="memory",
                    residency=KeyResidency(None),
                )

        async with h.channel() as one_channel, h.channel() as another:
            results = await asyncio.gather(
                *(one(i, one_channel if i % 2 else another) for i in range(count)),
                return_exceptions=True,
            )
        failed = [r for r in results if not isinstance(r, AgentIdentity)]
        assert failed == [], f"{len(failed)} of {count} lost: {failed[:3]}"
        assert len({r.spiffe_id for r in results if isinstance(r, AgentIdentity)}) == count
        assert h.attestations("ok", "join_token") == count

    serve(rig, keys, scenario)


def test_the_token_is_single_use_and_the_second_attempt_is_permission_denied(
    rig: ServerRig, keys: KeyStore
) -> None:
    async def scenario(h: Harness) -> None:
        _, secret = await h.token()
        await h.attest("join_token", join_token(secret), h.key("a1"))
        error = await h.refused(h.attest("join_token", join_token(secret), h.key("a2")))
        assert error.status == Status.PERMISSION_DENIED
        assert error.code == "join_token_used"
        assert secret not in str(error)
        assert h.attestations("refused", "join_token") == 1

    serve(rig, keys, scenario)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_concurrent_attestations_with_one_token_exactly_one_succeeds(
    backend: str, acme: None, keys: KeyStore, request: pytest.FixtureRequest
) -> None:
    url = None if backend == "sqlite" else request.getfixturevalue("postgres_db")
    rig = ServerRig.create(sections=ACME_SECTIONS, datastore_url=url)

    async def scenario(h: Harness) -> None:
        _, secret = await h.token()
        results = await asyncio.gather(
            *(h.attest("join_token", join_token(secret), h.key(f"c{i}")) for i in range(4)),
            return_exceptions=True,
        )
        won = [r for r in results if isinstance(r, AgentIdentity)]
        lost = [r for r in results if isinstance(r, AgentApiError)]
        assert len(won) == 1 and len(lost) == 3, results
        assert {(e.status, e.code) for e in lost} == {
            (Status.PERMISSION_DENIED, "join_token_used")
        }
        assert [a.id for a in h.datastore.agents.list()] == [won[0].spiffe_id]

    try:
        serve(rig, keys, scenario)
    finally:
        rig.destroy()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_an_attestation_is_one_unit_of_work_and_a_failed_agent_write_leaves_nothing(
    backend: str,
    acme: None,
    keys: KeyStore,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Decision 0108: the credentials' audit rows, the signing keys' bookkeeping, the
    agent row and the attestation's audit row commit together. When the agent row
    cannot be written, nothing of the attestation is in the datastore (no audit row of
    credentials never returned) and the audit log has no line for it."""
    url = None if backend == "sqlite" else request.getfixturevalue("postgres_db")
    rig = ServerRig.create(sections=ACME_SECTIONS, datastore_url=url)
    caplog.set_level(logging.INFO, logger="custos.audit")

    async def scenario(h: Harness) -> None:
        _, secret = await h.token()
        await asyncio.to_thread(break_writes, rig.url, "INSERT", "agents")
        error = await h.refused(h.attest("join_token", join_token(secret), h.key("a")))
        assert error.status == Status.UNAVAILABLE
        assert h.datastore.agents.list() == [] and h.datastore.audit.since(0) == []
        for purpose in ("x509-ca", "wit"):
            assert [k.last_not_after for k in h.datastore.signing_keys.of_purpose(purpose)] == [
                None
            ]

    try:
        serve(rig, keys, scenario)
    finally:
        rig.destroy()
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "custos.audit"]
    assert [line for line in lines if "records" in line] == []


def test_unknown_and_expired_tokens_are_refused_and_nothing_is_written(
    rig: ServerRig, keys: KeyStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="custos.audit")

    async def scenario(h: Harness) -> None:
        _, expired = await h.token(60, now=time.time() - 3600)
        for secret, code in (
            ("not-a-token-we-issued", "join_token_unknown"),
            (expired, "join_token_expired"),
        ):
            error = await h.refused(h.attest("join_token", join_token(secret), h.key(code)))
            assert (error.status, error.code) == (Status.PERMISSION_DENIED, code)
        assert h.datastore.agents.list() == []
        assert h.datastore.audit.since(0) == []

    serve(rig, keys, scenario)
    # ... but each refusal has its audit line (log only: nothing was issued).
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "custos.audit"]
    assert [(x["event"], x["outcome"], x["attestor"], x["code"]) for x in lines] == [
        ("attestation", "refused", "join_token", "join_token_unknown"),
        ("attestation", "refused", "join_token", "join_token_expired"),
    ]


# -- attestors: unknown, re-attestation, bans, evictions --------------------------------


def test_an_unknown_attestor_is_invalid_argument_naming_it(rig: ServerRig, keys: KeyStore) -> None:
    async def scenario(h: Harness) -> None:
        _, secret = await h.token()
        error = await h.refused(
            h.attest("join_token", join_token(secret), h.key("a"), attestor_name="tpm_devid")
        )
        assert (error.status, error.code) == (Status.INVALID_ARGUMENT, "attestor_unknown")
        assert "tpm_devid" in error.message
        # The token was not spent by a request that named no attestor of ours.
        await h.attest("join_token", join_token(secret), h.key("b"))
        assert h.attestations("refused", "unknown") == 1

    serve(rig, keys, scenario)


def test_a_challenge_round_trip_attests_and_a_wrong_answer_is_refused(
    rig: ServerRig, keys: KeyStore
) -> None:
    async def scenario(h: Harness) -> None:
        identity = await h.attest("acme_challenge", {"name": "node1"}, h.key("a"))
        assert identity.spiffe_id == SpiffeId.parse(
            f"spiffe://{TD}/custos/agent/acme_challenge/node1"
        )
        assert [str(s) for s in identity.selectors] == ["acme_challenge:node:node1"]
        assert identity.reattestable is True
        # Another attestor cannot answer this one's challenge.
        error = await h.refused(h.attest("acme_challenge", {"name": "bad node"}, h.key("b")))
        assert (error.status, error.code) == (Status.PERMISSION_DENIED, "acme_refused")

    serve(rig, keys, scenario)


def test_reattestation_only_through_a_reattestable_attestor_or_after_eviction(
    rig: ServerRig, keys: KeyStore
) -> None:
    async def scenario(h: Harness) -> None:
        first = await h.attest("acme_challenge", {"name": "n1"}, h.key("a"))
        again = await h.attest("acme_challenge", {"name": "n1"}, h.key("b"))
        assert again.spiffe_id == first.spiffe_id
        assert h.datastore.agents.get(first.spiffe_id).serial == format(
            again.x509_svid[0].serial_number, "x"
        )

        once = await h.attest("acme_once", {"name": "n2"}, h.key("c"))
        error = await h.refused(h.attest("acme_once", {"name": "n2"}, h.key("d")))
        assert (error.status, error.code) == (
            Status.PERMISSION_DENIED,
            "agent_already_attested",
        )
        h.datastore.agents.evict(once.spiffe_id)
        back = await h.attest("acme_once", {"name": "n2"}, h.key("e"))
        assert back.spiffe_id == once.spiffe_id
        assert not h.datastore.agents.get(once.spiffe_id).evicted

    serve(rig, keys, scenario)


def test_a_banned_agent_cannot_attest_again(rig: ServerRig, keys: KeyStore) -> None:
    async def scenario(h: Harness) -> None:
        first = await h.attest("acme_challenge", {"name": "n1"}, h.key("a"))
        h.datastore.agents.ban(first.spiffe_id)
        before = len(h.datastore.audit.since(0))
        error = await h.refused(h.attest("acme_challenge", {"name": "n1"}, h.key("b")))
        assert (error.status, error.code) == (Status.PERMISSION_DENIED, "agent_banned")
        assert len(h.datastore.audit.since(0)) == before  # nothing issued
        assert h.datastore.agents.get(first.spiffe_id).banned

    serve(rig, keys, scenario)


def test_an_evicted_join_token_agent_attests_again_with_a_new_token(
    rig: ServerRig, keys: KeyStore
) -> None:
    async def scenario(h: Harness) -> None:
        _, secret = await h.token()
        first = await h.attest("join_token", join_token(secret), h.key("a"))
        h.datastore.agents.evict(first.spiffe_id)
        _, secret2 = await h.token()
        second = await h.attest("join_token", join_token(secret2), h.key("b"))
        assert second.spiffe_id != first.spiffe_id  # a token's id names the agent
        assert not h.datastore.agents.get(second.spiffe_id).evicted

    serve(rig, keys, scenario)


# -- the agent's key: the CSR gives the public key, nothing else -------------------------


def _csr_with(key: Any, *, san: str | None = None) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "someone-else")])
    )
    if san is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(san)]), critical=False
        )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(Encoding.DER)


async def raw_attest(
    channel: grpc.aio.Channel, requests: list[agent_v1_pb2.AttestAgentRequest]
) -> list[agent_v1_pb2.AttestAgentResponse]:
    """Send exactly ``requests`` (no client-side checks); the responses, or the error.

    When the server ends a call while grpcio is still writing to it, grpcio replaces
    the server's status by a local INTERNAL "Internal error from Core" (grpc.aio
    ``_write`` calls ``set_internal_error``; about once in 300 refusals when idle,
    almost always for some streams under load).  That is the client's race, not the
    server's answer: the server had already decided on the messages written before
    the failed write, so the stream is sent again cut to those messages.  Each race
    shortens the stream, so this ends (every caller here sends streams that are
    refused, or that spend nothing before the write that races)."""
    while True:
        call = agent_v1_pb2_grpc.AttestationStub(channel).AttestAgent(timeout=10)
        responses = []
        written = 0
        try:
            for request in requests:
                await call.write(request)
                written += 1
            await call.done_writing()
            while (response := await call.read()) is not grpc.aio.EOF:
                responses.append(response)
        except Exception:  # noqa: BLE001 - grpc raises several types once a call has ended
            pass  # the server (or the TLS handshake) ended the call early: its status says why
        code = await call.code()
        details = await call.details() or ""
        if code is grpc.StatusCode.INTERNAL and details == _CORE_RACE_DETAILS:
            if written == len(requests):  # not the write race: a real INTERNAL
                raise AgentApiError.from_status(status_of(code), details)
            requests = requests[:written]
            continue
        if code is not grpc.StatusCode.OK:
            raise AgentApiError.from_status(status_of(code), details)
        return responses


#: grpc.aio's local status for a write the transport refused (see raw_attest).
_CORE_RACE_DETAILS = "Internal error from Core"


def start(
    attestor: str, payload: bytes, csr: bytes, tier: str = "memory"
) -> agent_v1_pb2.AttestAgentRequest:
    return agent_v1_pb2.AttestAgentRequest(
        start=agent_v1_pb2.AttestationStart(
            attestor=attestor,
            payload=payload,
            key=agent_v1_pb2.AgentKeyRequest(csr=csr, custody=types_v1_pb2.KeyCustody(tier=tier)),
        )
    )


def token_payload(secret: str) -> bytes:
    return b'{"v":1,"token":"' + secret.encode() + b'"}'


def test_a_csr_whose_signature_does_not_verify_is_refused_before_the_token_is_spent(
    rig: ServerRig, keys: KeyStore
) -> None:
    async def scenario(h: Harness) -> None:
        _, secret = await h.token()
        good = _csr_with(ec.generate_private_key(ec.SECP256R1()))
        broken = bytearray(good)
        broken[-5] ^= 0x01  # inside the signature
        async with h.raw_channel() as channel:
            for csr, code in (
                (bytes(broken), "invalid_csr"),
                (b"\x30\x03junk", "invalid_csr"),
                (b"", "attestation_protocol"),
            ):
                error = await h.refused(
                    raw_attest(channel, [start("join_token", token_payload(secret), csr)])
                )
                assert (error.status, error.code) == (Status.INVALID_ARGUMENT, code)
            error = await h.refused(
                raw_attest(channel, [start("join_token", token_payload(secret), good, "vault")])
            )
            assert (error.status, error.code) == (
                Status.INVALID_ARGUMENT,
                "invalid_custody",
            )
            assert h.attestations("refused", "join_token") == 4
            # The token is still good.
            [response] = await raw_attest(
                channel, [start("join_token", token_payload(secret), good)]
            )
            assert response.WhichOneof("step") == "result"

    serve(rig, keys, scenario)


def test_a_weak_or_unsupported_key_is_refused(rig: ServerRig, keys: KeyStore) -> None:
    async def scenario(h: Harness) -> None:
        weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        p521 = ec.generate_private_key(ec.SECP521R1())
        # Ed25519 makes X.509-SVIDs but no WIT-SVID, and an agent needs both.
        edwards = ed25519.Ed25519PrivateKey.generate()
        async with h.raw_channel() as channel:
            for key, code in (
                (weak, "invalid_csr"),
                (p521, "invalid_csr"),
                (edwards, "invalid_public_key"),
            ):
                token_id, secret = await h.token()
                error = await h.refused(
                    raw_attest(
                        channel, [start("join_token", token_payload(secret), _csr_with(key))]
                    )
                )
                assert (error.status, error.code) == (Status.INVALID_ARGUMENT, code)
                # Refused before the attestor ran: the single-use token is not spent.
                assert h.datastore.join_tokens.get(token_id).consumed_at is None, key
        assert h.datastore.agents.list() == []
        assert h.datastore.audit.since(0) == []

    serve(rig, keys, scenario)


@pytest.mark.parametrize("alg", ["ES384", "RS256", "PS256"])
def test_every_agent_key_algorithm_attests(rig: ServerRig, keys: KeyStore, alg: str) -> None:
    async def scenario(h: Harness) -> None:
        _, secret = await h.token()
        key = h.key("agent", alg)
        identity = await h.attest("join_token", join_token(secret), key)
        assert spki(identity.x509_svid[0].public_key()) == spki(key.public_key())

    serve(rig, keys, scenario)


def test_the_client_refuses_an_eddsa_agent_key_before_spending_the_token(
    rig: ServerRig, keys: KeyStore
) -> None:
    async def scenario(h: Harness) -> None:
        _, secret = await h.token()
        with pytest.raises(CustosError) as info:
            await h.attest("join_token", join_token(secret), h.key("ed", "EdDSA"))
        assert info.value.code == "invalid_agent_key"
        await h.attest("join_token", join_token(secret), h.key("ec"))  # the token still works

    serve(rig, keys, scenario)


def test_what_the_csr_asks_for_is_ignored_only_its_key_is_used(
    rig: ServerRig, keys: KeyStore
) -> None:
    async def scenario(h: Harness) -> None:
        token_id, secret = await h.token()
        key = ec.generate_private_key(ec.SECP256R1())
        csr = _csr_with(key, san="spiffe://evil.example/custos/server")
        async with h.raw_channel() as channel:
            [response] = await raw_attest(
                channel, [start("join_token", token_payload(secret), csr)]
            )
        leaf = der_chain(response.result.x509_svid)[0]
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [
            f"spiffe://{TD}/custos/agent/join_token/{token_id}"
        ]
        assert spki(leaf.public_key()) == spki(key.public_key())
        assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME) == []

    serve(rig, keys, scenario)


def test_a_tpm_held_agent_key_signs_its_csr_in_the_tpm(
    rig: ServerRig, swtpm: Any, tmp_path: Path
) -> None:
    tpm = open_key_store(KeyStoreConfig(store="tpm", tcti=swtpm.tcti, key_dir=tmp_path / "tpm"))
    try:

        async def scenario(h: Harness) -> None:
            _, secret = await h.token()
            key = h.key("agent-tpm")
            identity = await h.attest("join_token", join_token(secret), key, custody="tpm")
            assert spki(identity.x509_svid[0].public_key()) == spki(key.public_key())
            assert key.store is tpm
            rows = [r for r in h.datastore.audit.since(0) if r.identity == str(identity.spiffe_id)]
            assert rows and {r.custody for r in rows} == {"tpm"}

        serve(rig, tpm, scenario)
    finally:
        tpm.close()


# -- the stream: order, sizes, hang-ups, the deadline --------------------------------


def test_the_first_message_must_be_start_and_answers_only_follow_challenges(
    rig: ServerRig, keys: KeyStore
) -> None:
    async def scenario(h: Harness) -> None:
        _, secret = await h.token()
        csr = make_csr(h.key("a"))
        answer = agent_v1_pb2.AttestAgentRequest(challenge_response=b"x")
        empty = agent_v1_pb2.AttestAgentRequest()
        async with h.raw_channel() as channel:
            for requests in (
                [answer, start("join_token", token_payload(secret), csr)],
                [empty],
                [],
                [start("acme_challenge", b"n1", csr), start("acme_challenge", b"n1", csr)],
            ):
                error = await h.refused(raw_attest(channel, requests))
                assert (error.status, error.code) == (
                    Status.INVALID_ARGUMENT,
                    "attestation_protocol",
                ), requests
        assert h.datastore.agents.list() == []

    serve(rig, keys, scenario)


def test_oversized_fields_are_refused(rig: ServerRig, keys: KeyStore) -> None:
    async def scenario(h: Harness) -> None:
        csr = make_csr(h.key("a"))
        big = b"a" * (64 * 1024 + 1)
        async with h.raw_channel() as channel:
            for requests in (
                [start("join_token", big, csr)],
                [start("join_token", b"a" * (1 << 20), csr)],  # 1 MiB: within grpc's limit
                [start("x" * 129, b"p", csr)],
                [start("join_token", b"p", big)],
                [
                    start("acme_challenge", b"n1", csr),
                    agent_v1_pb2.AttestAgentRequest(challenge_response=big),
                ],
            ):
                error = await h.refused(raw_attest(channel, requests))
                assert error.status == Status.INVALID_ARGUMENT, error

    serve(rig, keys, scenario)


def test_a_client_hanging_up_mid_attestation_writes_nothing_and_the_server_goes_on(
    rig: ServerRig, keys: KeyStore
) -> None:
    async def scenario(h: Harness) -> None:
        import acme_attest  # type: ignore[import-not-found]

        acme_attest.HANGING.clear()
        attempt = asyncio.create_task(
            h.attest("acme_challenge", {"name": "n1", "hang": True}, h.key("a"))
        )
        # The server has sent its challenge once the agent half waits for ever.
        while not acme_attest.HANGING.is_set():
            assert not attempt.done(), attempt
            await asyncio.sleep(0.01)
        attempt.cancel()
        with pytest.raises(asyncio.CancelledError):
            await attempt
        # The server counts the stream once its handler has ended (the hang-up ends it).
        while not any(h.attestations(o, "acme_challenge") for o in ("error", "refused")):
            await asyncio.sleep(0.01)
        assert h.datastore.agents.list() == []
        assert h.datastore.audit.since(0) == []
        again = await h.attest("acme_challenge", {"name": "n1"}, h.key("b"))
        assert again.spiffe_id.path == "/custos/agent/acme_challenge/n1"

    serve(rig, keys, scenario)


# -- RenewAgent ------------------------------------------------------------------------


def test_a_join_token_agent_renews_with_its_wit_and_a_new_key(
    rig: ServerRig, keys: KeyStore
) -> None:
    from custos.agent.client.calls import AgentApiClient

    async def scenario(h: Harness) -> None:
        _, secret = await h.token()
        key = h.key("a")
        identity = await h.attest("join_token", join_token(secret), key)
        new_key = h.key("b")
        async with open_channel(
            h.srv.agent_api_address,
            bundle=identity.bundle,
            server_name=h.srv.ctx.config.agent_api.dns_name,
        ) as channel:
            client = AgentApiClient(channel, identity, key)
            renewed = await renew_agent(client, new_key, "memory")
        assert renewed.spiffe_id == identity.spiffe_id
        assert spki(renewed.x509_svid[0].public_key()) == spki(new_key.public_key())
        agent = h.datastore.agents.get(identity.spiffe_id)
        assert agent.serial == format(renewed.x509_svid[0].serial_number, "x")
        [renewal] = [r for r in h.datastore.audit.since(0) if r.event == "agent-renewal"]
        assert renewal.serial_or_jti == agent.serial

    serve(rig, keys, scenario)


def test_renewal_is_refused_for_reattestable_and_evicted_agents(
    rig: ServerRig, keys: KeyStore
) -> None:
    from custos.agent.client.calls import AgentApiClient

    async def scenario(h: Harness) -> None:
        key = h.key("a")
        identity = await h.attest("acme_challenge", {"name": "n1"}, key)
        async with h.channel() as channel:
            client = AgentApiClient(channel, identity, key)
            error = await h.refused(renew_agent(client, h.key("b"), "memory"))
            assert (error.status, error.code) == (
                Status.FAILED_PRECONDITION,
                "renew_by_attesting",
            )

            _, secret = await h.token()
            joined = await h.attest("join_token", join_token(secret), h.key("c"))
            h.datastore.agents.evict(joined.spiffe_id)
            client = AgentApiClient(channel, joined, keys.get("c"))
            error = await h.refused(renew_agent(client, h.key("d"), "memory"))
            assert error.status in (
                Status.UNAUTHENTICATED,
                Status.PERMISSION_DENIED,
            )
            assert h.datastore.agents.get(joined.spiffe_id).evicted  # still evicted

    serve(rig, keys, scenario)


# -- channels ----------------------------------------------------------------------------


def test_insecure_bootstrap_pins_the_server_certificate_and_warns(
    rig: ServerRig, keys: KeyStore, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(h: Harness) -> None:
        _, secret = await h.token()
        name = h.srv.ctx.config.agent_api.dns_name
        with caplog.at_level(logging.WARNING, logger="custos.agent.client.channel"):
            channel = await open_insecure_bootstrap_channel(
                h.srv.agent_api_address, server_name=name
            )
        assert any("INSECURE BOOTSTRAP" in r.getMessage() for r in caplog.records)
        with AgentCatalog.load(
            TD,
            node_attestors=[PluginConfig("join_token", {"token": secret})],
            workload_attestors=[PluginConfig("example")],
        ) as catalog:
            async with channel:
                identity = await attest_agent(
                    channel, attestor=catalog.node_attestor, key=h.key("a"), custody="memory"
                )
        assert identity.bundle.x509_authorities == h.srv.ctx.bundle().x509_authorities

    serve(rig, keys, scenario)


def test_a_channel_with_another_bundle_or_name_does_not_connect(
    rig: ServerRig, keys: KeyStore
) -> None:
    from datetime import timedelta

    from custos.identity import TrustDomain
    from custos.x509 import CertificateAuthority

    async def scenario(h: Harness) -> None:
        other = CertificateAuthority.self_signed(
            ec.generate_private_key(ec.SECP256R1()), TrustDomain(TD), ttl=timedelta(hours=1)
        )
        name = h.srv.ctx.config.agent_api.dns_name
        for bundle, server_name in (
            (TrustBundle(TD, x509_authorities=(other.certificate,)), name),
            (h.srv.ctx.bundle(), "someone-else"),
        ):
            async with open_channel(
                h.srv.agent_api_address, bundle=bundle, server_name=server_name
            ) as channel:
                stub = agent_v1_grpc.AttestationStub(channel)
                error = await h.refused(
                    run_call(stub.RenewAgent(agent_v1_pb2.RenewAgentRequest(), timeout=10))
                )
                assert error.status == Status.UNAVAILABLE, (
                    error.status,
                    error.code,
                    error,
                )
                assert error.retryable

    serve(rig, keys, scenario)


@contextlib.asynccontextmanager
async def attestation_server(h: Harness, **settings: Any) -> AsyncIterator[str]:
    """A second Attestation service on the rig's context with other settings (a short
    deadline, a small cap); yields its address."""
    from custos.server.agent_api.attestation import AttestationServicer
    from custos.server.attestation import NodeAttestation
    from custos.server.tls import ServerTls, make_server_certificate

    ctx = h.srv.ctx
    name = ctx.config.agent_api.dns_name
    cert = make_server_certificate(ctx.ca_keys.current().ca(), ctx.server_id, name)
    server = grpc.aio.server()
    agent_v1_pb2_grpc.add_AttestationServicer_to_server(  # type: ignore[no-untyped-call]
        AttestationServicer(ctx, NodeAttestation(ctx, **settings)), server
    )
    port = server.add_secure_port("127.0.0.1:0", ServerTls(cert).credentials())
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def hanging_attestation(
    h: Harness, address: str, key: str, *, hang: bool = True
) -> AgentIdentity:
    """An agent half that stops answering after the server's challenge (with ``hang``)."""
    with AgentCatalog.load(
        TD,
        node_attestors=[PluginConfig("acme_challenge", {"name": "n1", "hang": hang})],
        workload_attestors=[PluginConfig("example")],
    ) as catalog:
        bundle = h.srv.ctx.bundle()
        server_name = h.srv.ctx.config.agent_api.dns_name
        async with open_channel(address, bundle=bundle, server_name=server_name) as channel:
            return await attest_agent(
                channel, attestor=catalog.node_attestor, key=h.key(key), custody="memory"
            )


def test_an_attestation_past_its_deadline_ends_deadline_exceeded_and_writes_nothing(
    rig: ServerRig, keys: KeyStore
) -> None:
    async def scenario(h: Harness) -> None:
        async with attestation_server(h, deadline=0.5) as address:
            error = await h.refused(hanging_attestation(h, address, "a"))
        assert (error.status, error.code) == (
            Status.DEADLINE_EXCEEDED,
            "attestation_timeout",
        )
        assert h.datastore.agents.list() == []
        assert h.attestations("refused", "acme_challenge") == 1

    serve(rig, keys, scenario)


def test_attestations_past_the_cap_are_resource_exhausted_and_retryable(
    rig: ServerRig, keys: KeyStore
) -> None:
    async def scenario(h: Harness) -> None:
        import acme_attest  # type: ignore[import-not-found]

        acme_attest.HANGING.clear()
        async with attestation_server(h, max_pending=1) as address:
            first = asyncio.create_task(hanging_attestation(h, address, "a"))
            while not acme_attest.HANGING.is_set():
                assert not first.done(), first
                await asyncio.sleep(0.01)
            error = await h.refused(hanging_attestation(h, address, "b"))
            assert (error.status, error.code) == (
                Status.RESOURCE_EXHAUSTED,
                "too_many_calls",
            )
            assert error.retryable
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
            # The slot is free again once the server has counted the hung-up stream.
            while not any(h.attestations(o, "acme_challenge") for o in ("error", "refused")):
                await asyncio.sleep(0.01)
            identity = await hanging_attestation(h, address, "c", hang=False)
        assert [a.id for a in h.datastore.agents.list()] == [identity.spiffe_id]

    serve(rig, keys, scenario)


def test_the_database_gone_is_unavailable_and_attestation_works_again_when_it_returns(
    acme: None, keys: KeyStore
) -> None:
    from custos.testing.postgres import start_postgres

    own = start_postgres()  # stopped below: not the session's shared cluster
    rig = ServerRig.create(sections=ACME_SECTIONS, datastore_url=own.create_database())

    async def scenario(h: Harness) -> None:
        _, first = await h.token()
        _, second = await h.token()
        h.bundle = h.srv.ctx.bundle()  # read while the database is up
        await asyncio.to_thread(own.stop)
        try:
            error = await h.refused(h.attest("join_token", join_token(first), h.key("a")))
            assert (error.status, error.code) == (
                Status.UNAVAILABLE,
                "datastore_unavailable",
            )
            assert error.retryable
            assert h.attestations("error", "join_token") == 1
        finally:
            await asyncio.to_thread(own.start)
        # The refused attempt spent nothing: both tokens still attest.
        for secret, name in ((first, "b"), (second, "c")):
            for attempt in range(100):  # the pool reconnects on its next use
                try:
                    await h.attest("join_token", join_token(secret), h.key(f"{name}{attempt}"))
                    break
                except AgentApiError as e:
                    if not e.retryable or attempt == 99:
                        raise
                    await asyncio.sleep(0.1)

    try:
        serve(rig, keys, scenario)
    finally:
        rig.destroy()
        own.destroy()


def test_channel_arguments_are_checked_before_anything_connects() -> None:
    from custos.bundle import TrustBundle
    from custos.testing.server import free_port

    async def scenario() -> None:
        with pytest.raises(AgentApiError) as info:
            open_channel("127.0.0.1:1", bundle=TrustBundle(TD), server_name="custos-server")
        assert info.value.code == "agent_api_no_roots"
        for address in ("no-port", "host:", "host:99999", ":80"):
            with pytest.raises(AgentApiError) as info:
                await open_insecure_bootstrap_channel(address, server_name="custos-server")
            assert info.value.code == "agent_api_address", address
        with pytest.raises(AgentApiError) as info:
            await open_insecure_bootstrap_channel("127.0.0.1:1", server_name="")
        assert info.value.code == "agent_api_server_name"
        # Nobody listens: the TOFU fetch fails cleanly, and may be retried.
        with pytest.raises(AgentApiError) as info:
            await open_insecure_bootstrap_channel(
                f"127.0.0.1:{free_port()}", server_name="custos-server", timeout=5
            )
        assert info.value.status == Status.UNAVAILABLE and info.value.retryable

    asyncio.run(scenario())
