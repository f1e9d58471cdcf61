"""The public TPM layer's attestation pieces: AK (quote, certify), EK, signature forms."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tpm2_pytss.constants import TPM2_GENERATED, TPM2_ST, TPMA_OBJECT
from tpm2_pytss.types import TPMS_ATTEST

from custos.keys.tpm import TpmKeyStore
from custos.testing.swtpm import SwtpmInstance
from custos.tpm.ak import AK_ALGORITHM, certify, create_ak, load_ak, quote
from custos.tpm.blobs import signing_key_blob
from custos.tpm.context import TpmContext, shared_context
from custos.tpm.ek import ek_certificate, ek_public_key
from custos.tpm.errors import BadKeyBlobError
from custos.tpm.signatures import der_signature


@pytest.fixture
def ctx(swtpm: SwtpmInstance) -> Iterator[TpmContext]:
    with shared_context(swtpm.tcti) as c:
        yield c


def _attested(attest: object) -> tuple[bytes, TPMS_ATTEST]:
    """The signed bytes of a TPM2B_ATTEST (its contents) and their parse."""
    raw = bytes(attest.marshal())[2:]  # type: ignore[attr-defined]
    parsed, used = TPMS_ATTEST.unmarshal(raw)
    assert used == len(raw)
    return raw, parsed


def _verify(ak_public: object, raw: bytes, sig: object) -> None:
    assert isinstance(ak_public, ec.EllipticCurvePublicKey)
    ak_public.verify(der_signature(AK_ALGORITHM, sig), raw, ec.ECDSA(hashes.SHA256()))


def test_ak_is_restricted_p256_and_round_trips(ctx: TpmContext) -> None:
    ak = create_ak(ctx)
    assert ak.attributes & TPMA_OBJECT.RESTRICTED
    assert ak.attributes & TPMA_OBJECT.FIXEDTPM and ak.attributes & TPMA_OBJECT.FIXEDPARENT
    assert not ak.attributes & TPMA_OBJECT.DECRYPT
    again = load_ak(ak.to_pem())
    assert again.name == ak.name
    pub = again.public_key
    assert isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name == "secp256r1"


def test_quote_with_the_ak_verifies(ctx: TpmContext) -> None:
    ak = create_ak(ctx)
    nonce = b"fresh-nonce-0123"
    attest, sig = quote(ctx, ak, "sha256:0,1,7", nonce)
    raw, parsed = _attested(attest)
    assert parsed.magic == TPM2_GENERATED.VALUE
    assert parsed.type == TPM2_ST.ATTEST_QUOTE
    assert bytes(parsed.extraData) == nonce
    _verify(ak.public_key, raw, sig)
    # A signature over other bytes does not verify: the check above can fail.
    with pytest.raises(InvalidSignature):
        _verify(ak.public_key, raw[:-1] + bytes([raw[-1] ^ 1]), sig)


def test_certify_a_workload_key_with_the_ak(
    swtpm: SwtpmInstance, ctx: TpmContext, tmp_path: Path
) -> None:
    with TpmKeyStore(tcti=swtpm.tcti, key_dir=tmp_path / "keys") as store:
        store.create("w", "ES256")
        key = signing_key_blob(store.key_path("w").read_bytes())
        store.sign("w", b"keep it loaded")  # certify must still find a free slot
        ak = create_ak(ctx)
        attest, sig = certify(ctx, ak, key, b"n2")
    raw, parsed = _attested(attest)
    assert parsed.type == TPM2_ST.ATTEST_CERTIFY
    assert bytes(parsed.attested.certify.name) == key.name
    assert bytes(parsed.extraData) == b"n2"
    _verify(ak.public_key, raw, sig)


def test_ak_functions_refuse_a_workload_key(swtpm: SwtpmInstance, tmp_path: Path) -> None:
    with TpmKeyStore(tcti=swtpm.tcti, key_dir=tmp_path / "keys") as store:
        store.create("w", "ES256")
        pem = store.key_path("w").read_bytes()
    with pytest.raises(BadKeyBlobError, match="attestation key") as info:
        load_ak(pem)
    assert info.value.code == "bad_key_file"


@pytest.mark.parametrize("profile", ["rsa2048", "ecc-p384"])
def test_ek_public_key_matches_its_certificate(ctx: TpmContext, profile: str) -> None:
    def read(ectx: object) -> tuple[x509.Certificate | None, object]:
        return ek_certificate(ectx, profile), ek_public_key(ectx, profile)

    cert, public = ctx.device(read)
    assert cert is not None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    assert public.public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)  # type: ignore[attr-defined]


def test_absent_ek_certificate_is_none(ctx: TpmContext) -> None:
    assert ctx.device(lambda ectx: ek_certificate(ectx, "ecc-p256")) is None


def test_certify_uses_the_handle_the_store_keeps_loaded(
    swtpm: SwtpmInstance, ctx: TpmContext, tmp_path: Path
) -> None:
    from custos.tpm.blobs import read_key_file

    with TpmKeyStore(tcti=swtpm.tcti, key_dir=tmp_path / "keys") as store:
        store.create("w", "ES256")
        store.sign("w", b"loads it and keeps it")
        stamp, pem = read_key_file(str(store.key_path("w")), what="w")
        key = signing_key_blob(pem)
        entry = (str(tmp_path / "keys"), "w")
        assert ctx.is_loaded(entry)
        ak = create_ak(ctx)
        attest, sig = certify(ctx, ak, key, b"n3", loaded=(entry, stamp))
        assert ctx.is_loaded(entry)  # still cached for the next signature
        _, parsed = _attested(attest)
        assert bytes(parsed.attested.certify.name) == key.name
        # Another stamp (the file changed): the cached key is flushed, the file's
        # key loaded, checked and flushed for the certify.
        other = (stamp[0], stamp[1] + 1, stamp[2])
        attest, sig = certify(ctx, ak, key, b"n4", loaded=(entry, other))
        assert not ctx.is_loaded(entry)
        raw, parsed = _attested(attest)
        assert bytes(parsed.attested.certify.name) == key.name
        _verify(ak.public_key, raw, sig)
        store.sign("w", b"still signs")


def test_quote_covers_the_values_read_and_no_others(ctx: TpmContext) -> None:
    from tpm2_pytss.types import TPML_PCR_SELECTION

    from custos.tpm.verify import quote_covers

    ak = create_ak(ctx)
    _, _, digests = ctx.device(lambda e: e.pcr_read(TPML_PCR_SELECTION.parse("sha256:0,7")))
    values = {("sha256", 0): bytes(digests.digests[0]), ("sha256", 7): bytes(digests.digests[1])}
    attest, _ = quote(ctx, ak, "sha256:0,7", b"nonce")
    assert quote_covers(bytes(attest), values)
    assert not quote_covers(bytes(attest), {**values, ("sha256", 7): b"\x01" * 32})
