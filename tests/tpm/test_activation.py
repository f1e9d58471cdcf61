"""Credential activation on the session swtpm: MakeCredential (no TPM) and
ActivateCredential (AK + EK loaded next to the storage primary)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from tpm2_pytss.types import TPM2B_PUBLIC

from custos.keys.tpm import TpmKeyStore
from custos.testing.swtpm import SwtpmInstance
from custos.tpm.activation import (
    POLICY_A_SHA384,
    POLICY_C_SHA384,
    ActivationError,
    activate_credential,
    ek_public_area,
    make_credential,
)
from custos.tpm.ak import create_ak
from custos.tpm.context import TpmContext, shared_context
from custos.tpm.ek import ek_certificate
from custos.tpm.errors import TpmError
from custos.tpm.verify import AttestationEvidenceError, parse_public, public_key, spki_sha256


@pytest.fixture
def ctx(swtpm: SwtpmInstance) -> Iterator[TpmContext]:
    with shared_context(swtpm.tcti) as c:
        yield c


@pytest.fixture
def ek(ctx: TpmContext) -> TPM2B_PUBLIC:
    # As the server gets it: marshalled by the agent, parsed whole.
    return parse_public(bytes(ek_public_area(ctx, "rsa2048").marshal()), what="EK")


def test_wrong_ak_name_is_refused_by_the_tpm(ctx: TpmContext, ek: TPM2B_PUBLIC) -> None:
    ak, other = create_ak(ctx), create_ak(ctx)
    _secret, blob, enc = make_credential(ek, other.name)
    with pytest.raises(ActivationError, match="refused to activate") as info:
        activate_credential(ctx, ak, "rsa2048", blob, enc)
    assert info.value.code == "activation_failed"


@pytest.mark.parametrize("which", ["blob", "secret"])
def test_corrupt_credential_is_refused(ctx: TpmContext, ek: TPM2B_PUBLIC, which: str) -> None:
    ak = create_ak(ctx)
    _secret, blob, enc = make_credential(ek, ak.name)
    if which == "blob":
        blob = blob[:-1] + bytes([blob[-1] ^ 1])
    else:
        enc = enc[:-1] + bytes([enc[-1] ^ 1])
    with pytest.raises(ActivationError) as info:
        activate_credential(ctx, ak, "rsa2048", blob, enc)
    assert info.value.code == "activation_failed"


@pytest.mark.parametrize(
    "blob, enc",
    [(b"", b"\x00\x01x"), (b"\x00\x05ab", b"\x00\x01x"), (b"\x00\x01xyz", b"\x00\x01x")],
)
def test_malformed_blobs_are_refused_before_the_tpm(
    ctx: TpmContext, blob: bytes, enc: bytes
) -> None:
    ak = create_ak(ctx)
    with pytest.raises(ActivationError) as info:
        activate_credential(ctx, ak, "rsa2048", blob, enc)
    assert info.value.code == "activation_failed"


def test_credential_for_another_tpms_ek_is_refused(ctx: TpmContext, swtpm_factory: object) -> None:
    other = swtpm_factory(new_identity=True)  # type: ignore[operator]
    with shared_context(other.tcti) as octx:
        other_ek = ek_public_area(octx, "rsa2048")
    ak = create_ak(ctx)
    _secret, blob, enc = make_credential(other_ek, ak.name)
    with pytest.raises(ActivationError):
        activate_credential(ctx, ak, "rsa2048", blob, enc)


def test_make_credential_refuses_a_key_that_is_not_an_ek(ctx: TpmContext) -> None:
    ak = create_ak(ctx)
    ak_public, _ = TPM2B_PUBLIC.unmarshal(bytes(ak.tss.public.marshal()))
    with pytest.raises(AttestationEvidenceError) as info:
        make_credential(ak_public, ak.name)
    assert info.value.code == "ek_unusable"


def test_activation_releases_the_secret(ctx: TpmContext, ek: TPM2B_PUBLIC) -> None:
    ak = create_ak(ctx)
    secret, blob, enc = make_credential(ek, ak.name)
    assert len(secret) == 32
    assert activate_credential(ctx, ak, "rsa2048", blob, enc) == secret
    # A second credential gets another secret; the same AK activates it again.
    secret2, blob2, enc2 = make_credential(ek, ak.name)
    assert secret2 != secret
    assert activate_credential(ctx, ak, "rsa2048", blob2, enc2) == secret2


def test_ek_public_area_is_the_certified_key(ctx: TpmContext, ek: TPM2B_PUBLIC) -> None:
    cert = ctx.device(lambda ectx: ek_certificate(ectx, "rsa2048"))
    assert cert is not None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    assert public_key(ek).public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)
    assert len(spki_sha256(public_key(ek))) == 64


def test_unknown_ek_profile_is_refused(ctx: TpmContext) -> None:
    ak = create_ak(ctx)
    with pytest.raises(TpmError, match="cannot be used"):
        activate_credential(ctx, ak, "rsa4096", b"\x00\x01x", b"\x00\x01x")


def test_p384_ek_activation_uses_the_high_range_policy(ctx: TpmContext) -> None:
    # swtpm's ECC P-384 EK: high-range template, PolicyOR(PolicyA, PolicyC) in SHA-384.
    ek = parse_public(bytes(ek_public_area(ctx, "ecc-p384").marshal()), what="EK")
    assert public_key(ek).curve.name == "secp384r1"  # type: ignore[union-attr]
    ak = create_ak(ctx)
    secret, blob, enc = make_credential(ek, ak.name)
    assert activate_credential(ctx, ak, "ecc-p384", blob, enc) == secret
    _s, blob, enc = make_credential(ek, create_ak(ctx).name)
    with pytest.raises(ActivationError):
        activate_credential(ctx, ak, "ecc-p384", blob, enc)


def test_high_range_policy_digests(ctx: TpmContext) -> None:
    # PolicyA is PolicySecret(TPM_RH_ENDORSEMENT), and PolicyOR(A, C) is the template's
    # authPolicy: the constants are the TCG profile's (TPM 2.0 Part 3, PolicySecret and
    # PolicyOR digest rules).
    h = hashlib.sha384
    policy_a = h(h(bytes(48) + (0x151).to_bytes(4, "big") + (0x4000000B).to_bytes(4, "big"))
                 .digest()).digest()  # fmt: skip
    assert policy_a == POLICY_A_SHA384
    policy_b = h(bytes(48) + (0x171).to_bytes(4, "big") + POLICY_A_SHA384 + POLICY_C_SHA384)
    ek = ek_public_area(ctx, "ecc-p384")
    assert bytes(ek.publicArea.authPolicy) == policy_b.digest()


def test_activation_with_signing_keys_kept_loaded(
    swtpm: SwtpmInstance, ctx: TpmContext, ek: TPM2B_PUBLIC, tmp_path: Path
) -> None:
    # Two workload keys stay loaded (primary + 2 = swtpm's 3 slots): activation
    # needs AK + EK and must make room, then the store signs again.
    with TpmKeyStore(tcti=swtpm.tcti, key_dir=tmp_path / "k", loaded_key_cache=2) as store:
        store.create("a", "ES256")
        store.create("b", "ES256")
        store.sign("a", b"x")
        store.sign("b", b"y")
        ak = create_ak(ctx)
        secret, blob, enc = make_credential(ek, ak.name)
        assert activate_credential(ctx, ak, "rsa2048", blob, enc) == secret
        store.sign("a", b"again")
        assert ek_public_area(ctx, "rsa2048").marshal() == ek.marshal()


@pytest.mark.parametrize("profile", ["rsa2048", "ecc-p256", "ecc-p384"])
def test_swtpm_ek_public_areas_are_the_tcg_templates(ctx: TpmContext, profile: str) -> None:
    from custos.tpm.activation import check_ek_template

    ek = parse_public(bytes(ek_public_area(ctx, profile).marshal()), what="EK")
    check_ek_template(ek, profile)
    others = {"rsa2048", "ecc-p256", "ecc-p384"} - {profile}
    for other in others:
        with pytest.raises(AttestationEvidenceError) as info:
            check_ek_template(ek, other)
        assert info.value.code == "ek_unusable"
    with pytest.raises(AttestationEvidenceError):
        check_ek_template(ek, "rsa4096")


def test_an_ek_key_in_a_public_area_of_another_shape_is_refused(
    ctx: TpmContext, ek: TPM2B_PUBLIC
) -> None:
    """The EK certificate vouches for the key only: for a SHA-384 name algorithm on the
    RSA-2048 EK, swtpm answers the activation with TPM_RC_FAILURE; the server refuses
    such an area before making a credential."""
    from tpm2_pytss.constants import TPM2_ALG, TPMA_OBJECT

    from custos.tpm.activation import check_ek_template

    changes = [
        lambda a: setattr(a, "nameAlg", TPM2_ALG.SHA384),
        lambda a: setattr(a.parameters.rsaDetail.symmetric.keyBits, "aes", 256),
        lambda a: setattr(a, "objectAttributes", a.objectAttributes | TPMA_OBJECT.USERWITHAUTH),
        lambda a: setattr(a, "authPolicy", b""),
        lambda a: setattr(a.parameters.rsaDetail, "exponent", 3),
    ]
    for change in changes:
        area = parse_public(bytes(ek.marshal()), what="EK")
        change(area.publicArea)
        with pytest.raises(AttestationEvidenceError) as info:
            check_ek_template(area, "rsa2048")
        assert info.value.code == "ek_unusable"
