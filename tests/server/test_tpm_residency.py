"""Key residency (issue 10, decision 0063): a ``tpm``-custody key's TPM2_Certify by the
agent's activated attestation key is checked before anything is issued for it, and the
result is recorded in the audit.

Everything is real: the AKs (``custos.tpm.ak.create_ak``) and the certified keys (a
:class:`~custos.keys.tpm.TpmKeyStore` on the session swtpm), the certify statements
(``custos.tpm.ak.certify``), the CSRs (signed inside the TPM). Refusals first: a
statement by another AK, a key that is not fixedTPM, a statement about another key
than the one the credential binds, an agent without an AK on an entry that requires
residency; then what is issued and audited.

The issuer is driven directly (SQLite and PostgreSQL, ``parts``); the agent's own key
through a real server (``AttestAgent``) with a test node attestor, ``akt``, whose
server half believes the AK its payload names (the plugin is not under test; the
server's check of the agent key's evidence against that AK is).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from grpclib.const import Status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tpm2_pytss.constants import TPMA_OBJECT

from custos._proto import agent_v1_pb2, types_v1_pb2
from custos.agent.client.attest import AgentIdentity, attest_agent, make_csr
from custos.agent.residency import KeyResidency
from custos.keys import KeyStore, StoreKey
from custos.keys.jwk import public_jwk_members
from custos.keys.tpm import TpmKeyStore
from custos.plugin import AgentCatalog, PluginConfig
from custos.server.issuer import (
    CustodyEvidence,
    Issued,
    ResidencyError,
    WitRequest,
    X509Request,
    key_residency,
)
from custos.testing.server import ServerRig
from custos.testing.swtpm import SwtpmInstance
from custos.tpm.ak import AK_ALGORITHM, certify, create_ak, with_ak
from custos.tpm.blobs import KeyBlob, signing_key_blob
from custos.tpm.context import TpmContext, shared_context
from custos.tpm.signatures import SCHEMES
from custos.tpm.templates import KEY_ATTRIBUTES, key_template

from . import test_issuer
from .test_attestation import Harness, _csr_with, raw_attest, serve, token_payload
from .test_issuer import AGENT, Parts

TD = "example.org"
#: The issuer tests' fixtures: a datastore (both backends), signing keys, an Issuer.
key_store = test_issuer.key_store
parts = test_issuer.parts


# -- a TPM: an AK, keys in a TpmKeyStore, certify statements ---------------------------


@dataclass
class Tpm:
    ctx: TpmContext
    store: TpmKeyStore
    ak: KeyBlob
    certified: tuple[bytes, bytes, bytes] = (b"", b"", b"")
    certified_key: Any = None

    @staticmethod
    def public(blob: KeyBlob) -> bytes:
        return bytes(blob.tss.public.marshal())

    @property
    def ak_public(self) -> bytes:
        return self.public(self.ak)

    def new_ak(self) -> KeyBlob:
        return create_ak(self.ctx)

    def key(self, name: str) -> StoreKey:
        self.store.create(name, "ES256")
        return self.store.get(name)

    def blob(self, name: str) -> KeyBlob:
        return signing_key_blob(self.store.key_path(name).read_bytes())

    def certify(self, name: str, ak: KeyBlob | None = None) -> tuple[bytes, bytes, bytes]:
        """(TPMS_ATTEST, TPMT_SIGNATURE, TPM2B_PUBLIC) of TPM2_Certify of key ``name``."""
        blob = self.blob(name)
        attest, signature = certify(self.ctx, ak or self.ak, blob, b"")
        return bytes(attest.marshal())[2:], bytes(signature.marshal()), self.public(blob)

    def evidence(self, name: str, ak: KeyBlob | None = None) -> CustodyEvidence:
        return CustodyEvidence("tpm", *self.certify(name, ak))

    def loose_key_evidence(self) -> CustodyEvidence:
        """A certify statement (by the AK) of a key that may leave the TPM: no
        fixedTPM, no fixedParent (made here: no custos store makes such a key)."""
        template = key_template(AK_ALGORITHM)
        template.objectAttributes = KEY_ATTRIBUTES & ~(
            TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
        )
        private, public = self.ctx.device(lambda ectx: self.ctx.create(template))

        def op(ectx: Any, ak_handle: Any) -> tuple[Any, Any]:
            handle = self.ctx.load("loose key", SimpleNamespace(private=private, public=public))
            try:
                return ectx.certify(handle, ak_handle, b"", SCHEMES[AK_ALGORITHM])  # type: ignore[no-any-return]
            finally:
                self.ctx.flush(handle)

        attest, signature = with_ak(self.ctx, self.ak, op)
        return CustodyEvidence(
            "tpm", bytes(attest.marshal())[2:], bytes(signature.marshal()), bytes(public.marshal())
        )


@pytest.fixture
def tpm(swtpm: SwtpmInstance, tmp_path: Path) -> Iterator[Tpm]:
    """An AK and an empty key store on the session swtpm; ``certified`` is a genuine
    statement (by the AK) of the key ``certified_key`` for tests that only read it."""
    store = TpmKeyStore(tcti=swtpm.tcti, key_dir=tmp_path / "tpm-keys", loaded_key_cache=0)
    try:
        with shared_context(swtpm.tcti) as ctx:
            made = Tpm(ctx, store, create_ak(ctx))
            made.certified_key = made.key("fixture-certified").public_key()
            made.certified = made.certify("fixture-certified")
            yield made
    finally:
        store.close()


def codes(results: list[Issued]) -> list[str | None]:
    return [None if r.error is None else r.error.code for r in results]


def jwk(key: StoreKey) -> dict[str, Any]:
    return {**public_jwk_members(key.public_key()), "alg": "ES256"}


def tpm_agent(parts: Parts, ak_public: bytes) -> Any:
    """The agent as the datastore holds it after a TPM attestation with this AK."""
    return parts.store.agents.attested(
        AGENT, attestor="tpm", selectors=["tpm:ek_pubhash:00"], serial="01", expires_at=2e9,
        attestation_key=ak_public,
    )  # fmt: skip


# -- workload keys: refusals ------------------------------------------------------------


def test_a_certify_by_another_ak_is_refused(parts: Parts, tpm: Tpm) -> None:
    agent = tpm_agent(parts, tpm.ak_public)
    entry = parts.entry("/db", key_custody="tpm")
    key = tpm.key("w")
    other_ak = tpm.new_ak()  # the same TPM, even: only the agent's activated AK counts
    evidence = tpm.evidence("w", other_ak)

    x509 = parts.issuer.x509_svids(agent, [X509Request(entry.id, make_csr(key), evidence)])
    wits = parts.issuer.wits(agent, [WitRequest(entry.id, jwk(key), evidence)])

    assert codes(x509) == codes(wits) == ["bad_signature"]
    assert parts.store.audit.since() == []
    assert parts.refused("x509-svid", "bad_signature") == 1


def test_a_certify_of_a_key_that_is_not_fixed_tpm_is_refused(parts: Parts, tpm: Tpm) -> None:
    agent = tpm_agent(parts, tpm.ak_public)
    entry = parts.entry("/db", key_custody="tpm")
    evidence = tpm.loose_key_evidence()

    [x509] = parts.issuer.x509_svids(
        agent, [X509Request(entry.id, make_csr(tpm.key("w")), evidence)]
    )

    assert codes([x509]) == ["key_not_resident"]
    assert parts.store.audit.since() == []


def test_evidence_for_another_key_than_the_credentials_is_refused(parts: Parts, tpm: Tpm) -> None:
    agent = tpm_agent(parts, tpm.ak_public)
    entry = parts.entry("/db", key_custody="tpm")
    asked, certified = tpm.key("asked"), tpm.key("certified")
    evidence = tpm.evidence("certified")  # genuine, by the agent's AK, of another key

    x509 = parts.issuer.x509_svids(agent, [X509Request(entry.id, make_csr(asked), evidence)])
    wits = parts.issuer.wits(agent, [WitRequest(entry.id, jwk(asked), evidence)])

    assert codes(x509) == codes(wits) == ["certify_key_mismatch"]
    assert parts.store.audit.since() == []
    # The same evidence with its own key is fine: the refusal was the mismatch.
    ok = parts.issuer.x509_svids(agent, [X509Request(entry.id, make_csr(certified), evidence)])
    assert codes(ok) == [None]


@pytest.mark.parametrize(
    "evidence",
    [
        CustodyEvidence("tpm", b"\x01garbage", b"\x02sig", b""),
        CustodyEvidence("tpm", b"", b"", b"\x00\x01x"),
    ],
    ids=["garbage", "public-only"],
)
def test_evidence_that_does_not_parse_is_refused_without_require_residency(
    parts: Parts, tpm: Tpm, evidence: CustodyEvidence
) -> None:
    agent = tpm_agent(parts, tpm.ak_public)
    entry = parts.entry("/db", key_custody="tpm")  # residency not required: still checked
    [x509] = parts.issuer.x509_svids(
        agent, [X509Request(entry.id, make_csr(tpm.key("w")), evidence)]
    )
    assert x509.error is not None and x509.error.code in (
        "bad_attest",
        "bad_signature",
        "bad_public",
    )
    assert parts.store.audit.since() == []


def test_an_agent_without_an_attestation_key_is_refused_where_residency_is_required(
    parts: Parts, tpm: Tpm
) -> None:
    agent = parts.agent()  # attested without an AK (a join token, say)
    required = parts.entry("/db", key_custody="tpm", require_residency=True)
    key = tpm.key("w")
    evidence = tpm.evidence("w")  # genuine, but no AK of this agent to check it against

    x509 = parts.issuer.x509_svids(agent, [X509Request(required.id, make_csr(key), evidence)])
    wits = parts.issuer.wits(agent, [WitRequest(required.id, jwk(key), evidence)])
    jwt = parts.issuer.jwt_svid(agent, required.id, ["db"])

    assert codes(x509) == codes(wits) == codes([jwt]) == ["residency_unproven"]
    assert x509[0].error is not None and "no attestation key" in x509[0].error.message
    assert parts.store.audit.since() == []

    # An entry that does not require it: issued, recorded unproven (evidence kept).
    relaxed = parts.entry("/web", key_custody="tpm")
    [issued] = parts.issuer.x509_svids(agent, [X509Request(relaxed.id, make_csr(key), evidence)])
    assert issued.error is None
    [row] = parts.store.audit.since()
    assert (row.custody, row.residency) == ("tpm", "unproven")
    assert row.evidence.count(".") == 2  # attest.signature.tpm_public, base64


def test_required_residency_without_evidence_is_refused(parts: Parts, tpm: Tpm) -> None:
    agent = tpm_agent(parts, tpm.ak_public)
    required = parts.entry("/db", key_custody="tpm", require_residency=True)
    [x509] = parts.issuer.x509_svids(
        agent, [X509Request(required.id, make_csr(tpm.key("w")), CustodyEvidence("tpm"))]
    )
    assert codes([x509]) == ["residency_unproven"]
    assert x509.error is not None and "no certify evidence" in x509.error.message
    assert parts.store.audit.since() == []


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    info=st.binary(max_size=200),
    signature=st.binary(max_size=120),
    public=st.binary(max_size=160),
    flip=st.integers(min_value=0, max_value=10_000),
)
def test_forged_or_flipped_evidence_is_never_proven(
    tpm: Tpm, info: bytes, signature: bytes, public: bytes, flip: int
) -> None:
    """Random blobs, and a genuine statement with one byte flipped in one of its three
    parts: refused with a verify code, never ``proven``, never another exception."""
    genuine = tpm.certified
    parts_ = [bytearray(p) for p in genuine]
    part = parts_[flip % 3]
    part[(flip // 3) % len(part)] ^= 1 + flip % 255
    for evidence in (
        CustodyEvidence("tpm", info, signature, public),
        CustodyEvidence("tpm", *(bytes(p) for p in parts_)),
    ):
        try:
            residency = key_residency(tpm.ak_public, evidence, tpm.certified_key)
        except ResidencyError as e:
            assert e.code != "residency_unproven"
            continue
        assert residency == "unproven" and not evidence.has_evidence


# -- workload keys: proven ----------------------------------------------------------------


def test_proven_residency_is_issued_and_audited(parts: Parts, tpm: Tpm) -> None:
    agent = tpm_agent(parts, tpm.ak_public)
    required = parts.entry("/db", key_custody="tpm", require_residency=True)
    memory = parts.entry("/cache", selectors=["unix:uid:1001"])
    key = tpm.key("w")
    evidence = tpm.evidence("w")

    [x509] = parts.issuer.x509_svids(agent, [X509Request(required.id, make_csr(key), evidence)])
    [wit] = parts.issuer.wits(agent, [WitRequest(required.id, jwk(key), evidence)])
    jwt = parts.issuer.jwt_svid(agent, required.id, ["db"])  # an agent with an AK: served
    [other] = parts.issuer.x509_svids(
        agent, [X509Request(memory.id, make_csr(tpm.key("m")), CustodyEvidence("memory"))]
    )

    assert codes([x509, wit, jwt, other]) == [None, None, None, None]
    rows = parts.store.audit.since()
    assert [(r.event, r.custody, r.residency) for r in rows] == [
        ("x509-svid", "tpm", "proven"),
        ("wit", "tpm", "proven"),
        ("jwt-svid", "", ""),
        ("x509-svid", "memory", ""),
    ]
    assert rows[0].evidence == evidence.encoded() and rows[0].evidence.count(".") == 2


# -- the agent's own key, through AttestAgent --------------------------------------------

AKT_MODULE = """
import json

from custos.plugin.protocols import AttestedNode


class Server:
    supports_reattestation = True

    def configure(self, config, core):
        pass

    def close(self):
        pass

    async def attest(self, payload):
        claim = json.loads(payload)
        yield AttestedNode(
            agent_path=[claim["name"]],
            selectors=["node:" + claim["name"]],
            attestation_key=bytes.fromhex(claim["ak"]),
        )


class Agent:
    def configure(self, config, core):
        self.claim = {"name": config["name"], "ak": config["ak"]}

    def close(self):
        pass

    async def attestation_flow(self):
        yield json.dumps(self.claim).encode()
"""

AKT_ENTRY_POINTS = """
[custos.server.node_attestors]
akt = akt_attest:Server

[custos.agent.node_attestors]
akt = akt_attest:Agent
"""


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ServerRig]:
    site = tmp_path / "site"
    info = site / "akt_attest-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: akt-attest\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(AKT_ENTRY_POINTS)
    (site / "akt_attest.py").write_text(AKT_MODULE)
    monkeypatch.syspath_prepend(str(site))
    import importlib

    importlib.invalidate_caches()
    made = ServerRig.create(sections={"node_attestors.akt": {}})
    yield made
    made.destroy()


@pytest.fixture
def keys(tpm: Tpm) -> KeyStore:
    return tpm.store


class Certifier:
    """The agent half's KeyCertifier: TPM2_Certify by ``ak`` of the key asked for, or
    of ``instead`` (a key in the same store) when given."""

    def __init__(self, tpm: Tpm, ak: KeyBlob, instead: str | None = None) -> None:
        self.tpm, self.ak, self.instead = tpm, ak, instead

    def certify_key(self, key_name: str, key_path: str) -> tuple[bytes, bytes, bytes] | None:
        return self.tpm.certify(self.instead or key_name, self.ak)


async def attest(
    h: Harness, key: StoreKey, ak_public: bytes, certifier: Certifier | None, name: str = "n1"
) -> AgentIdentity:
    settings = {"name": name, "ak": ak_public.hex()}
    with AgentCatalog.load(
        TD,
        node_attestors=[PluginConfig("akt", settings)],
        workload_attestors=[PluginConfig("example")],
    ) as catalog:
        async with h.channel() as channel:
            return await attest_agent(
                channel,
                attestor=catalog.node_attestor,
                key=key,
                custody="tpm",
                residency=KeyResidency(certifier, "akt"),
            )


def test_an_agent_key_certified_by_another_ak_is_refused(rig: ServerRig, tpm: Tpm) -> None:
    async def scenario(h: Harness) -> None:
        key = tpm.key("agent")
        error = await h.refused(attest(h, key, tpm.ak_public, Certifier(tpm, tpm.new_ak())))
        assert (error.status, error.code) == (Status.PERMISSION_DENIED, "bad_signature")
        assert h.datastore.agents.list() == [] and h.datastore.audit.since() == []

    serve(rig, tpm.store, scenario)


def test_an_agent_key_in_the_tpm_tier_without_evidence_is_refused_on_a_node_with_an_ak(
    rig: ServerRig, tpm: Tpm
) -> None:
    async def scenario(h: Harness) -> None:
        error = await h.refused(attest(h, tpm.key("agent"), tpm.ak_public, None))
        assert (error.status, error.code) == (
            Status.PERMISSION_DENIED,
            "residency_unproven",
        )
        assert h.datastore.agents.list() == []

    serve(rig, tpm.store, scenario)


def test_evidence_for_another_key_than_the_agents_csr_is_refused(rig: ServerRig, tpm: Tpm) -> None:
    async def scenario(h: Harness) -> None:
        key = tpm.key("agent")
        tpm.key("other")
        certifier = Certifier(tpm, tpm.ak, instead="other")
        error = await h.refused(attest(h, key, tpm.ak_public, certifier))
        assert error.code == "certify_key_mismatch"
        assert h.datastore.agents.list() == []

    serve(rig, tpm.store, scenario)


def test_a_proven_agent_key_keeps_its_ak_and_a_reattestation_replaces_it(
    rig: ServerRig, tpm: Tpm
) -> None:
    async def scenario(h: Harness) -> None:
        key = tpm.key("agent")
        identity = await attest(h, key, tpm.ak_public, Certifier(tpm, tpm.ak))

        agent = h.datastore.agents.get(identity.spiffe_id)
        assert agent.attestation_key == tpm.ak_public
        rows = [r for r in h.datastore.audit.since() if r.identity == str(identity.spiffe_id)]
        assert sorted((r.event, r.custody, r.residency) for r in rows) == [
            ("attestation", "tpm", "proven"),
            ("wit", "tpm", "proven"),
            ("x509-svid", "tpm", "proven"),
        ]
        # The node attests again with a new AK (its AK file was lost, say): the stored
        # AK follows, and a statement by the old AK no longer proves anything.
        new_ak = tpm.new_ak()
        again = await attest(h, key, Tpm.public(new_ak), Certifier(tpm, new_ak))
        assert again.spiffe_id == identity.spiffe_id
        assert h.datastore.agents.get(identity.spiffe_id).attestation_key == Tpm.public(new_ak)
        error = await h.refused(attest(h, key, Tpm.public(new_ak), Certifier(tpm, tpm.ak)))
        assert error.code == "bad_signature"

    serve(rig, tpm.store, scenario)


def test_an_agent_whose_node_has_no_ak_is_attested_with_residency_unproven(
    rig: ServerRig, tpm: Tpm
) -> None:
    async def scenario(h: Harness) -> None:
        key = tpm.key("agent")
        _, secret = await h.token()
        identity = await h.attest("join_token", {"token": secret}, key, custody="tpm")
        agent = h.datastore.agents.get(identity.spiffe_id)
        assert agent.attestation_key == b""
        rows = [r for r in h.datastore.audit.since() if r.identity == str(identity.spiffe_id)]
        assert {(r.custody, r.residency) for r in rows} == {("tpm", "unproven")}

    serve(rig, tpm.store, scenario)


@pytest.mark.parametrize(
    ("size", "status", "code"),
    [
        (1025, Status.INVALID_ARGUMENT, "invalid_custody"),  # over the issuer's 1 KiB
        (64 * 1024 + 1, Status.INVALID_ARGUMENT, "attestation_protocol"),
    ],
)
def test_an_oversized_tpm_public_is_refused_before_the_token_is_spent(
    rig: ServerRig, tpm: Tpm, size: int, status: Status, code: str
) -> None:
    async def scenario(h: Harness) -> None:
        _, secret = await h.token()
        csr = _csr_with(ec.generate_private_key(ec.SECP256R1()))

        def start(tpm_public: bytes) -> agent_v1_pb2.AttestAgentRequest:
            custody = types_v1_pb2.KeyCustody(tier="tpm", tpm_public=tpm_public)
            key = agent_v1_pb2.AgentKeyRequest(csr=csr, custody=custody)
            return agent_v1_pb2.AttestAgentRequest(
                start=agent_v1_pb2.AttestationStart(
                    attestor="join_token", payload=token_payload(secret), key=key
                )
            )

        async with h.raw_channel() as channel:
            error = await h.refused(raw_attest(channel, [start(b"\x00" * size)]))
            assert (error.status, error.code) == (status, code)
            # The token is still good (and a join-token agent's evidence is only recorded).
            [response] = await raw_attest(channel, [start(b"\x00\x01x")])
            assert response.WhichOneof("step") == "result"

    serve(rig, tpm.store, scenario)
