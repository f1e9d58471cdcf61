"""Agent API call authentication (decision 4): the agent's WIT plus a WPT for the call,
checked on a real server (``custos.testing.server``) over TLS, on SQLite and
PostgreSQL. The refusals first; the call that passes last, so they mean something."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from grpclib.client import Channel
from grpclib.const import Status
from joserfc.jwk import ECKey

from custos._proto import agent_v1_grpc, agent_v1_pb2
from custos.agent.client.attest import AgentIdentity, make_csr
from custos.agent.client.calls import AgentApiClient, call_audience
from custos.agent.client.channel import open_channel
from custos.agent.client.errors import AgentApiError, run_call
from custos.identity import Selector, SpiffeId
from custos.keys import KeyStore, KeyStoreConfig, StoreKey, open_key_store
from custos.server.agent_api.auth import verify_call
from custos.server.app import Server
from custos.server.datastore import Datastore
from custos.server.issuer import CustodyEvidence
from custos.testing.server import ServerRig, running_server
from custos.wimse.errors import WptReplayError
from custos.wimse.wit import mint_wit
from custos.wimse.wpt import create_wpt

TD = "example.org"
SVIDS = "custos.agent.v1.Svids"
NODE = (Selector("node", "n1"),)
T = TypeVar("T")


def server_rig(store_url: str) -> Iterator[ServerRig]:
    rig = ServerRig.create(datastore_url=store_url)
    yield rig
    rig.destroy()


def agent_keys() -> Iterator[KeyStore]:
    store = open_key_store(KeyStoreConfig(store="memory"))
    yield store
    store.close()


@pytest.fixture
def rig(store_url: str) -> Iterator[ServerRig]:
    yield from server_rig(store_url)


@pytest.fixture
def keys() -> Iterator[KeyStore]:
    yield from agent_keys()


@dataclass
class Harness:
    """A running server and a way to make agents known to it."""

    srv: Server
    keys: KeyStore
    channels: list[Channel] = dataclasses.field(default_factory=list)

    @property
    def datastore(self) -> Any:
        return self.srv.ctx.datastore

    def channel(self) -> Channel:
        channel = open_channel(
            self.srv.agent_api_address,
            bundle=self.srv.ctx.bundle(),
            server_name=self.srv.ctx.config.agent_api.dns_name,
        )
        self.channels.append(channel)
        return channel

    def key(self, name: str, alg: str = "ES256") -> StoreKey:
        self.keys.create(name, alg)
        return self.keys.get(name)

    def make_agent(self, name: str, *, custody: str = "memory") -> AgentApiClient:
        """An attested agent as node attestation leaves it: credentials from the
        issuer, the agent recorded (the attestation flow is ATTEST's to test)."""
        key = self.key(f"agent-{name}")
        agent_id = SpiffeId.parse(f"spiffe://{TD}/custos/agent/test/{name}")
        ctx = self.srv.ctx
        creds = ctx.issuer.agent_credentials(
            agent_id, make_csr(key), CustodyEvidence(custody), attestor="test", selectors=NODE
        )
        ctx.datastore.agents.attested(
            agent_id,
            attestor="test",
            selectors=NODE,
            serial=format(creds.x509_svid.leaf.serial_number, "x"),
            expires_at=creds.not_after,
        )
        identity = AgentIdentity(
            spiffe_id=agent_id,
            x509_svid=creds.x509_svid.cert_chain,
            wit=creds.wit,
            bundle=ctx.bundle(),
            selectors=NODE,
            expires_at=creds.not_after,
            reattestable=False,
        )
        return AgentApiClient(self.channel(), identity, key)

    def entry(self, agent: AgentApiClient, path: str, **fields: Any) -> str:
        fields.setdefault("selectors", ["unix:uid:1000"])
        entry = self.datastore.entries.create(
            f"spiffe://{TD}{path}", agent.identity.spiffe_id, **fields
        )
        return str(entry.id)

    async def jwt_call(
        self, agent: AgentApiClient, entry_id: str, metadata: Sequence[tuple[str, str]]
    ) -> agent_v1_pb2.NewJWTSVIDResponse:
        """NewJWTSVID with hand-made metadata (what an attacker controls)."""
        stub = agent_v1_grpc.SvidsStub(agent.channel)
        request = agent_v1_pb2.NewJWTSVIDRequest(entry_id=entry_id, audience=["rp"])
        return await run_call(stub.NewJWTSVID(request, metadata=tuple(metadata), timeout=30))

    async def refused(self, attempt: Awaitable[object]) -> AgentApiError:
        with pytest.raises(AgentApiError) as info:
            await attempt
        return info.value


def serve(rig: ServerRig, keys: KeyStore, scenario: Callable[[Harness], Awaitable[T]]) -> T:
    async def main() -> T:
        async with running_server(rig) as srv:
            harness = Harness(srv, keys)
            try:
                return await scenario(harness)
            finally:
                for channel in harness.channels:
                    channel.close()

    return asyncio.run(main())


def wpt(agent: AgentApiClient, method: str, **options: Any) -> str:
    audience = call_audience(agent.identity.spiffe_id.trust_domain, SVIDS, method)
    return create_wpt(agent.key, agent.identity.wit, audience, **options)


def auth(wit: str, proof: str) -> list[tuple[str, str]]:
    return [("workload-identity-token", wit), ("workload-proof-token", proof)]


# -- metadata ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("no-wit", "wit_missing"),
        ("no-wpt", "wpt_missing"),
        ("nothing", "wit_missing"),
        ("two-wits", "wit_multiple"),
        ("two-wpts", "wpt_multiple"),
        ("huge-wit", "metadata_too_large"),
        ("huge-wpt", "metadata_too_large"),
    ],
)
def test_malformed_metadata_is_unauthenticated(
    rig: ServerRig, keys: KeyStore, case: str, code: str
) -> None:
    async def scenario(h: Harness) -> None:
        agent = h.make_agent("n1")
        entry_id = h.entry(agent, "/svc")
        wit, proof = agent.identity.wit, wpt(agent, "NewJWTSVID")
        metadata = {
            "no-wit": [("workload-proof-token", proof)],
            "no-wpt": [("workload-identity-token", wit)],
            "nothing": [],
            "two-wits": [*auth(wit, proof), ("workload-identity-token", wit)],
            "two-wpts": [*auth(wit, proof), ("workload-proof-token", proof)],
            "huge-wit": auth("a" * 5000, proof),
            "huge-wpt": auth(wit, "a" * 5000),
        }[case]
        error = await h.refused(h.jwt_call(agent, entry_id, metadata))
        assert (error.status, error.code) == (Status.UNAUTHENTICATED, code)
        assert h.datastore.audit.since()[-1].event == "wit"  # nothing issued after setup

    serve(rig, keys, scenario)


def test_metadata_past_grpcs_hard_limit_is_refused(rig: ServerRig, keys: KeyStore) -> None:
    """grpcio's client would not send 20,000 bytes of metadata (RESOURCE_EXHAUSTED);
    the agent's client (grpclib, decision 0126) does, and the server refuses it."""

    async def scenario(h: Harness) -> None:
        agent = h.make_agent("n1")
        entry_id = h.entry(agent, "/svc")
        metadata = auth("a" * 20000, wpt(agent, "NewJWTSVID"))
        error = await h.refused(h.jwt_call(agent, entry_id, metadata))
        assert error.status is Status.UNAUTHENTICATED, error
        assert "at most 4096 bytes" in error.message
        assert h.datastore.audit.since()[-1].event == "wit"  # nothing issued after setup

    serve(rig, keys, scenario)


# -- the proof ---------------------------------------------------------------------


def test_a_proof_for_another_method_is_refused(rig: ServerRig, keys: KeyStore) -> None:
    async def scenario(h: Harness) -> None:
        agent = h.make_agent("n1")
        entry_id = h.entry(agent, "/svc")
        proof = wpt(agent, "BatchNewWIT")  # the right key and WIT, the wrong call
        error = await h.refused(h.jwt_call(agent, entry_id, auth(agent.identity.wit, proof)))
        assert (error.status, error.code) == (Status.UNAUTHENTICATED, "wpt_bad_audience")

    serve(rig, keys, scenario)


def test_a_proof_for_another_wit_is_refused(rig: ServerRig, keys: KeyStore) -> None:
    async def scenario(h: Harness) -> None:
        agent = h.make_agent("n1")
        entry_id = h.entry(agent, "/svc")
        proof = wpt(agent, "NewJWTSVID")
        # A second WIT for the same key and agent: the proof binds the first one (wth).
        signer = h.srv.ctx.wit_keys.current()
        other_wit = mint_wit(
            signer.key,
            kid=signer.kid,
            subject=agent.identity.spiffe_id,
            workload_public_jwk=agent.key,
            ttl=600,
            profile="spiffe",
        )
        error = await h.refused(h.jwt_call(agent, entry_id, auth(other_wit, proof)))
        assert (error.status, error.code) == (Status.UNAUTHENTICATED, "wpt_wth_mismatch")

    serve(rig, keys, scenario)


def test_an_expired_proof_is_refused(rig: ServerRig, keys: KeyStore) -> None:
    async def scenario(h: Harness) -> None:
        agent = h.make_agent("n1")
        entry_id = h.entry(agent, "/svc")
        proof = wpt(agent, "NewJWTSVID", now=time.time() - 600)
        error = await h.refused(h.jwt_call(agent, entry_id, auth(agent.identity.wit, proof)))
        assert (error.status, error.code) == (Status.UNAUTHENTICATED, "wpt_expired")

    serve(rig, keys, scenario)


def test_a_replayed_proof_is_refused_here_and_by_another_server(
    rig: ServerRig, keys: KeyStore
) -> None:
    async def scenario(h: Harness) -> None:
        agent = h.make_agent("n1")
        entry_id = h.entry(agent, "/svc")
        metadata = auth(agent.identity.wit, wpt(agent, "NewJWTSVID"))
        first = await h.jwt_call(agent, entry_id, metadata)
        assert first.token

        error = await h.refused(h.jwt_call(agent, entry_id, metadata))
        assert (error.status, error.code) == (Status.UNAUTHENTICATED, "wpt_replayed")

        # A second server on the same database: its own Datastore object, same tables.
        from custos.server.datastore import Datastore

        other = Datastore.open(rig.url, trust_domain=TD)
        try:
            second_server = dataclasses.replace(h.srv.ctx, datastore=other)
            fresh = auth(agent.identity.wit, wpt(agent, "NewJWTSVID"))
            await h.jwt_call(agent, entry_id, fresh)  # used up on the first server
            with pytest.raises(WptReplayError):
                await asyncio.to_thread(verify_call, second_server, fresh, SVIDS, "NewJWTSVID")
        finally:
            other.close()

    serve(rig, keys, scenario)


# -- the WIT and the agent behind it --------------------------------------------------


def test_a_wit_signed_by_an_unknown_key_is_refused(rig: ServerRig, keys: KeyStore) -> None:
    async def scenario(h: Harness) -> None:
        agent = h.make_agent("n1")
        entry_id = h.entry(agent, "/svc")
        rogue = ECKey.generate_key("P-256", auto_kid=True)
        forged = mint_wit(
            rogue,
            alg="ES256",
            subject=agent.identity.spiffe_id,
            workload_public_jwk=agent.key,
            ttl=600,
            profile="spiffe",
        )
        forged_agent = AgentApiClient(
            agent.channel, dataclasses.replace(agent.identity, wit=forged), agent.key
        )
        proof = wpt(forged_agent, "NewJWTSVID")
        error = await h.refused(h.jwt_call(agent, entry_id, auth(forged, proof)))
        assert (error.status, error.code) == (Status.UNAUTHENTICATED, "wit_unknown_kid")

    serve(rig, keys, scenario)


def test_a_wit_of_a_foreign_trust_domain_is_refused(rig: ServerRig, keys: KeyStore) -> None:
    async def scenario(h: Harness) -> None:
        agent = h.make_agent("n1")
        entry_id = h.entry(agent, "/svc")
        # Signed with this server's own WIT key, but naming an agent of another domain.
        signer = h.srv.ctx.wit_keys.current()
        foreign = mint_wit(
            signer.key,
            kid=signer.kid,
            subject="spiffe://elsewhere.test/custos/agent/test/n1",
            workload_public_jwk=agent.key,
            ttl=600,
            profile="spiffe",
        )
        impostor = AgentApiClient(
            agent.channel, dataclasses.replace(agent.identity, wit=foreign), agent.key
        )
        error = await h.refused(
            h.jwt_call(agent, entry_id, auth(foreign, wpt(impostor, "NewJWTSVID")))
        )
        assert (error.status, error.code) == (
            Status.UNAUTHENTICATED,
            "wit_unknown_trust_domain",
        )

    serve(rig, keys, scenario)


def test_a_workload_wit_is_not_an_agent(rig: ServerRig, keys: KeyStore) -> None:
    async def scenario(h: Harness) -> None:
        agent = h.make_agent("n1")
        entry_id = h.entry(agent, "/svc")
        # A real WIT of this trust domain, but a workload's: it cannot call as an agent.
        signer = h.srv.ctx.wit_keys.current()
        workload_wit = mint_wit(
            signer.key,
            kid=signer.kid,
            subject=f"spiffe://{TD}/svc",
            workload_public_jwk=agent.key,
            ttl=600,
            profile="spiffe",
        )
        impostor = AgentApiClient(
            agent.channel, dataclasses.replace(agent.identity, wit=workload_wit), agent.key
        )
        error = await h.refused(
            h.jwt_call(agent, entry_id, auth(workload_wit, wpt(impostor, "NewJWTSVID")))
        )
        assert (error.status, error.code) == (Status.UNAUTHENTICATED, "not_an_agent")

    serve(rig, keys, scenario)


@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("evicted", Status.PERMISSION_DENIED, "agent_evicted"),
        ("banned", Status.PERMISSION_DENIED, "agent_banned"),
        ("unknown", Status.UNAUTHENTICATED, "agent_not_found"),
        ("reattested", Status.UNAUTHENTICATED, "agent_wit_superseded"),
    ],
)
def test_an_agent_that_may_no_longer_call_is_refused(
    rig: ServerRig, keys: KeyStore, case: str, status: Status, code: str
) -> None:
    async def scenario(h: Harness) -> None:
        agent = h.make_agent("n1")
        entry_id = h.entry(agent, "/svc")
        agent_id = agent.identity.spiffe_id
        if case == "evicted":
            h.datastore.agents.evict(agent_id)
        elif case == "banned":
            h.datastore.agents.ban(agent_id)
        elif case == "unknown":
            # Credentials from the issuer, but the agent was never recorded.
            stranger = h.key("stranger")
            stranger_id = SpiffeId.parse(f"spiffe://{TD}/custos/agent/test/stranger")
            creds = h.srv.ctx.issuer.agent_credentials(
                stranger_id, make_csr(stranger), CustodyEvidence("memory"),
                attestor="test", selectors=NODE,
            )  # fmt: skip
            identity = dataclasses.replace(agent.identity, spiffe_id=stranger_id, wit=creds.wit)
            agent = AgentApiClient(agent.channel, identity, stranger)
        else:  # attested again later: the WIT from before is dead
            h.datastore.agents.attested(
                agent_id, attestor="test", selectors=NODE, serial="02",
                expires_at=time.time() + 3600, now=time.time() + 120,
            )  # fmt: skip
        metadata = await asyncio.to_thread(agent.metadata, SVIDS, "NewJWTSVID")
        error = await h.refused(h.jwt_call(agent, entry_id, metadata))
        assert (error.status, error.code) == (status, code)

    serve(rig, keys, scenario)


def test_a_wit_key_removed_by_another_server_is_refused_at_the_next_call(
    rig: ServerRig, keys: KeyStore
) -> None:
    """The server keeps its WIT verifier between calls (decision 0107), but a key that
    any server removed from the datastore is not accepted by it at the next call: the
    kept verifier is one of the key rows read for that call, never older."""

    async def scenario(h: Harness) -> None:
        agent = h.make_agent("n1")  # its WIT is signed by the first WIT key
        entry_id = h.entry(agent, "/svc")
        old = h.srv.ctx.wit_keys.current().kid
        assert (await agent.new_jwt_svid(entry_id, ["rp"])).token  # verifier kept with it
        h.srv.ctx.wit_keys.rotate_now()
        # Retired, still in the bundle until what it signed expires: still accepted.
        assert (await agent.new_jwt_svid(entry_id, ["rp"])).token
        # Another server (its own datastore handle) prunes it, as if its WITs had expired.
        with Datastore.open(rig.url, trust_domain=TD) as other:
            far = time.time() + 10 * 365 * 86400
            removed = other.signing_keys.remove_expired("wit", retired_before=far, now=far)
        assert [r.kid for r in removed] == [old]
        error = await h.refused(agent.new_jwt_svid(entry_id, ["rp"]))
        assert (error.status, error.code) == (Status.UNAUTHENTICATED, "wit_unknown_kid")

    serve(rig, keys, scenario)


def test_a_proper_call_passes(rig: ServerRig, keys: KeyStore) -> None:
    async def scenario(h: Harness) -> None:
        agent = h.make_agent("n1")
        entry_id = h.entry(agent, "/svc")
        issued = await agent.new_jwt_svid(entry_id, ["rp"])
        assert issued.token and issued.expires_at > time.time()
        again = await agent.new_jwt_svid(entry_id, ["rp"])  # a fresh proof per call
        assert again.token != issued.token

    serve(rig, keys, scenario)
