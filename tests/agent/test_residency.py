"""custos.agent.residency: the node attestor's AK certifies tpm-tier keys (real swtpm,
real TPM2_Certify); refusals first: a certifier that fails or answers nonsense stops the
request instead of sending it without the evidence the agent was meant to have."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from custos.agent.client.attest import key_custody, key_request
from custos.agent.client.calls import WitParams, X509Params, _custody
from custos.agent.residency import (
    MAX_EVIDENCE_FIELD,
    CertifyEvidence,
    KeyCertifyError,
    KeyResidency,
)
from custos.errors import CustosError
from custos.keys import StoreKey
from custos.keys.software import MemoryKeyStore
from custos.keys.tpm import TpmKeyStore
from custos.plugin.protocols import KeyCertifier
from custos.testing.swtpm import SwtpmInstance
from custos.tpm.ak import certify, create_ak
from custos.tpm.blobs import KeyBlob, signing_key_blob
from custos.tpm.context import TpmContext, shared_context
from custos.tpm.verify import AttestationEvidenceError, parse_public, verify_certify


class AkCertifier:
    """What the tpm attestor's agent half does for certify_key: its AK certifies the
    key file at key_path (real TPM2_Certify)."""

    def __init__(self, ctx: TpmContext, ak: KeyBlob | None) -> None:
        self.ctx, self.ak = ctx, ak
        self.calls: list[tuple[str, str]] = []

    def certify_key(self, key_name: str, key_path: str) -> tuple[bytes, bytes, bytes] | None:
        self.calls.append((key_name, key_path))
        if self.ak is None:
            return None
        key = signing_key_blob(Path(key_path).read_bytes())
        attest, sig = certify(self.ctx, self.ak, key, b"")
        return (
            bytes(attest.marshal())[2:],
            bytes(sig.marshal()),
            bytes(key.tss.public.marshal()),
        )


class Answers:
    def __init__(self, answer: object) -> None:
        self.answer = answer

    def certify_key(self, key_name: str, key_path: str) -> object:
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


@pytest.fixture
def ctx(swtpm: SwtpmInstance) -> Iterator[TpmContext]:
    with shared_context(swtpm.tcti) as c:
        yield c


@pytest.fixture
def store(swtpm: SwtpmInstance, tmp_path: Path) -> Iterator[TpmKeyStore]:
    with TpmKeyStore(tcti=swtpm.tcti, key_dir=tmp_path / "keys") as s:
        yield s


@pytest.fixture
def key(store: TpmKeyStore) -> StoreKey:
    store.create("wl-e1-1", "ES256")
    return store.get("wl-e1-1")


# ---- refusals ---------------------------------------------------------------------------


def test_a_certifier_that_raises_stops_the_request(key: StoreKey) -> None:
    residency = KeyResidency(Answers(RuntimeError("TPM on fire")), "tpm")
    with pytest.raises(KeyCertifyError, match="TPM on fire") as e:
        residency.evidence(key, "tpm")
    assert e.value.code == "key_certify_failed"


def test_a_certifier_custos_error_keeps_its_code_in_the_message(key: StoreKey) -> None:
    residency = KeyResidency(Answers(CustosError("slots", code="tpm_slots_exhausted")), "tpm")
    with pytest.raises(KeyCertifyError, match=r"\[tpm_slots_exhausted\]"):
        residency.evidence(key, "tpm")


@pytest.mark.parametrize(
    "answer",
    [
        b"attest",
        (b"a", b"s"),
        (b"a", b"s", b"p", b"x"),
        [b"a", b"s", b"p"],
        (b"a", "s", b"p"),
        (b"", b"s", b"p"),
        (b"a", b"s", bytearray(b"p")),
        (b"a", b"s", b"p" * (MAX_EVIDENCE_FIELD + 1)),
    ],
)
def test_a_certifier_answering_nonsense_is_refused(key: StoreKey, answer: object) -> None:
    with pytest.raises(KeyCertifyError):
        KeyResidency(Answers(answer), "tpm").evidence(key, "tpm")


def test_a_tpm_tier_whose_store_has_no_key_files_is_refused() -> None:
    store = MemoryKeyStore()
    store.create("k", "ES256")
    residency = KeyResidency(Answers((b"a", b"s", b"p")), "tpm")
    with pytest.raises(KeyCertifyError, match="no key file"):
        residency.evidence_for(store, "k")


def test_evidence_for_another_tier_is_not_put_on_the_wire() -> None:
    evidence = CertifyEvidence(b"a", b"s", b"p")
    with pytest.raises(CustosError) as e:
        key_custody("memory", evidence)
    assert e.value.code == "invalid_custody"
    with pytest.raises(CustosError):
        key_request(b"csr", "exportable", evidence)


# ---- no evidence to give ----------------------------------------------------------------


def test_no_certifier_no_evidence(key: StoreKey) -> None:
    assert not KeyResidency(None).certifies
    assert KeyResidency(None).evidence(key, "tpm") is None
    assert not KeyResidency(object(), "join_token").certifies


def test_other_tiers_are_never_certified(key: StoreKey) -> None:
    certifier = Answers(RuntimeError("must not be called"))
    residency = KeyResidency(certifier, "tpm")
    assert residency.certifies
    for tier in ("pkcs11", "memory", "exportable"):
        assert residency.evidence(key, tier) is None


def test_a_certifier_without_an_ak_yet_gives_none(ctx: TpmContext, key: StoreKey) -> None:
    certifier = AkCertifier(ctx, None)
    assert isinstance(certifier, KeyCertifier)
    assert KeyResidency(certifier, "tpm").evidence(key, "tpm") is None
    assert certifier.calls == [(key.name, str(key.store.key_path(key.name)))]  # type: ignore[attr-defined]


# ---- real evidence ----------------------------------------------------------------------


def test_real_certify_evidence_verifies_for_this_key_only(
    ctx: TpmContext, store: TpmKeyStore, key: StoreKey
) -> None:
    ak = create_ak(ctx)
    evidence = KeyResidency(AkCertifier(ctx, ak), "tpm").evidence(key, "tpm")
    assert evidence is not None
    ak_public = parse_public(bytes(ak.tss.public.marshal()), what="AK")
    facts = verify_certify(
        ak_public,
        evidence.attest,
        evidence.signature,
        evidence.tpm_public,
        expected_key=key.public_key(),
    )
    assert facts.public.marshal() == evidence.tpm_public
    store.create("wl-e2-1", "ES256")
    with pytest.raises(AttestationEvidenceError) as e:
        verify_certify(
            ak_public,
            evidence.attest,
            evidence.signature,
            evidence.tpm_public,
            expected_key=store.public_key("wl-e2-1"),
        )
    assert e.value.code == "certify_key_mismatch"


def test_evidence_goes_into_every_key_custody_message(ctx: TpmContext, key: StoreKey) -> None:
    evidence = KeyResidency(AkCertifier(ctx, create_ak(ctx)), "tpm").evidence(key, "tpm")
    assert evidence is not None
    for custody in (
        key_custody("tpm", evidence),
        key_request(b"csr", "tpm", evidence).custody,
        _custody(X509Params("e1", b"csr", "tpm", evidence)),
        _custody(WitParams("e1", {}, "tpm", evidence)),
    ):
        assert custody.tier == "tpm"
        assert custody.tpm_certify_info == evidence.attest
        assert custody.tpm_certify_signature == evidence.signature
        assert custody.tpm_public == evidence.tpm_public
    bare = _custody(X509Params("e1", b"csr", "tpm"))
    assert (bare.tpm_certify_info, bare.tpm_certify_signature, bare.tpm_public) == (b"", b"", b"")
