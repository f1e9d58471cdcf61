"""custos.tpm.verify: quotes and certify statements from the session swtpm, and hand-built
evidence signed by a software "AK" for the checks a real TPM cannot be made to fail."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from tpm2_pytss.constants import TPM2_ST, TPMA_OBJECT
from tpm2_pytss.types import TPM2B_PUBLIC, TPML_PCR_SELECTION
from tpm_forge import SoftAk, certify_attest, pcr_digest, quote_attest

from custos.keys.algorithms import Algorithm
from custos.keys.tpm import TpmKeyStore
from custos.testing.swtpm import SwtpmInstance
from custos.tpm.ak import AK_ALGORITHM, certify, create_ak, quote, with_ak
from custos.tpm.blobs import KeyBlob, signing_key_blob
from custos.tpm.context import TpmContext, shared_context
from custos.tpm.signatures import SCHEMES
from custos.tpm.templates import AK_ATTRIBUTES, KEY_ATTRIBUTES, key_template
from custos.tpm.verify import (
    AttestationEvidenceError,
    QuoteFacts,
    ak_public_checked,
    check_monotonic,
    name,
    parse_public,
    public_key,
    spki_sha256,
    verify_certify,
    verify_quote,
)

SEL = "sha256:0,1,7"


@pytest.fixture
def ctx(swtpm: SwtpmInstance) -> Iterator[TpmContext]:
    with shared_context(swtpm.tcti) as c:
        yield c


def _public(blob: KeyBlob) -> TPM2B_PUBLIC:
    return parse_public(bytes(blob.tss.public.marshal()), what="test key")


def _pcrs(ctx: TpmContext, selection: str) -> dict[tuple[str, int], bytes]:
    def read(ectx: Any) -> dict[tuple[str, int], bytes]:
        _, _sel, digests = ectx.pcr_read(TPML_PCR_SELECTION.parse(selection))
        bank, _, idx = selection.partition(":")
        values = [bytes(digests.digests[i]) for i in range(int(digests.count))]
        return dict(zip(((bank, int(i)) for i in idx.split(",")), values, strict=True))

    return ctx.device(read)


def _quote(ctx: TpmContext, ak: KeyBlob, nonce: bytes, sel: str = SEL) -> tuple[bytes, bytes]:
    attest, sig = quote(ctx, ak, sel, nonce)
    return bytes(attest.marshal())[2:], bytes(sig.marshal())


def _refused(code: str, fn: Any, *args: Any, **kwargs: Any) -> AttestationEvidenceError:
    with pytest.raises(AttestationEvidenceError) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, info.value
    return info.value


# ---- negative: real TPM quotes ----------------------------------------------------


def test_quote_with_another_nonce_is_refused(ctx: TpmContext) -> None:
    ak = create_ak(ctx)
    attest, sig = _quote(ctx, ak, b"old-nonce")
    _refused(
        "nonce_mismatch", verify_quote, _public(ak), attest, sig, b"new-nonce", _pcrs(ctx, SEL), SEL
    )


def test_quote_whose_pcr_digest_does_not_match_is_refused(ctx: TpmContext) -> None:
    ak = create_ak(ctx)
    attest, sig = _quote(ctx, ak, b"n")
    values = _pcrs(ctx, SEL)
    values[("sha256", 7)] = bytes(32) if values[("sha256", 7)] != bytes(32) else b"\1" * 32
    _refused("pcr_digest_mismatch", verify_quote, _public(ak), attest, sig, b"n", values, SEL)


def test_quote_of_other_pcrs_is_refused(ctx: TpmContext) -> None:
    ak = create_ak(ctx)
    attest, sig = _quote(ctx, ak, b"n", "sha256:0,1")
    _refused(
        "pcr_selection_mismatch",
        verify_quote,
        _public(ak),
        attest,
        sig,
        b"n",
        _pcrs(ctx, "sha256:0,1"),
        SEL,
    )


@pytest.mark.parametrize("change", ["missing", "extra", "short"])
def test_reported_values_not_exactly_the_quoted_pcrs(ctx: TpmContext, change: str) -> None:
    ak = create_ak(ctx)
    attest, sig = _quote(ctx, ak, b"n")
    values = _pcrs(ctx, SEL)
    if change == "missing":
        del values[("sha256", 1)]
    elif change == "extra":
        values[("sha256", 2)] = bytes(32)
    else:
        values[("sha256", 1)] = values[("sha256", 1)][:-1]
    _refused("pcr_values_mismatch", verify_quote, _public(ak), attest, sig, b"n", values, SEL)


def test_quote_signed_by_another_ak_is_refused(ctx: TpmContext) -> None:
    ak, other = create_ak(ctx), create_ak(ctx)
    attest, sig = _quote(ctx, other, b"n")
    _refused("bad_signature", verify_quote, _public(ak), attest, sig, b"n", _pcrs(ctx, SEL), SEL)


def test_quote_byte_flipped_is_refused(ctx: TpmContext) -> None:
    ak = create_ak(ctx)
    attest, sig = _quote(ctx, ak, b"n")
    attest = attest[:-1] + bytes([attest[-1] ^ 1])
    _refused("bad_signature", verify_quote, _public(ak), attest, sig, b"n", _pcrs(ctx, SEL), SEL)


def test_certify_statement_is_not_a_quote(
    ctx: TpmContext, swtpm: SwtpmInstance, tmp_path: Path
) -> None:
    ak = create_ak(ctx)
    key = _workload_key(swtpm, tmp_path)
    attest, sig = certify(ctx, ak, key, b"n")
    raw = bytes(attest.marshal())[2:]
    _refused(
        "wrong_attest_type",
        verify_quote,
        _public(ak),
        raw,
        bytes(sig.marshal()),
        b"n",
        _pcrs(ctx, SEL),
        SEL,
    )
    q_attest, q_sig = _quote(ctx, ak, b"n")
    _refused(
        "wrong_attest_type",
        verify_certify,
        _public(ak),
        q_attest,
        q_sig,
        bytes(key.tss.public.marshal()),
    )


def test_not_restricted_ak_is_refused(
    ctx: TpmContext, swtpm: SwtpmInstance, tmp_path: Path
) -> None:
    key = _workload_key(swtpm, tmp_path)  # fixedTPM ECDSA P-256, but signs anything
    data = bytes(key.tss.public.marshal())
    _refused("ak_not_restricted", ak_public_checked, data)
    # A quote-shaped message it signed is refused for the key, not for the message.
    soft = SoftAk(attributes=KEY_ATTRIBUTES)
    attest = quote_attest(b"n", SEL, pcr_digest([bytes(32)] * 3))
    values = {("sha256", i): bytes(32) for i in (0, 1, 7)}
    _refused(
        "ak_not_restricted", verify_quote, soft.public, attest, soft.sign(attest), b"n", values, SEL
    )


@pytest.mark.parametrize(
    "attrs",
    [
        AK_ATTRIBUTES & ~TPMA_OBJECT.FIXEDTPM,
        AK_ATTRIBUTES & ~TPMA_OBJECT.SENSITIVEDATAORIGIN,
        AK_ATTRIBUTES | TPMA_OBJECT.DECRYPT,
    ],
)
def test_ak_attributes_are_all_required(attrs: TPMA_OBJECT) -> None:
    soft = SoftAk(attributes=attrs)
    _refused("ak_not_restricted", ak_public_checked, bytes(soft.public.marshal()))


def test_ak_of_another_algorithm_is_refused() -> None:
    area = key_template(Algorithm.ES384)
    area.objectAttributes = AK_ATTRIBUTES
    key = ec.generate_private_key(ec.SECP384R1()).public_key().public_numbers()
    area.unique.ecc.x, area.unique.ecc.y = key.x.to_bytes(48, "big"), key.y.to_bytes(48, "big")
    _refused("ak_bad_algorithm", ak_public_checked, bytes(TPM2B_PUBLIC(publicArea=area).marshal()))


# ---- negative: hand-built evidence, validly signed --------------------------------


def _soft_quote(**kw: Any) -> tuple[SoftAk, bytes, dict[tuple[str, int], bytes]]:
    soft = SoftAk()
    values = {("sha256", i): hashlib.sha256(bytes([i])).digest() for i in (0, 1, 7)}
    attest = quote_attest(b"n", SEL, pcr_digest(list(values.values())), **kw)
    return soft, attest, values


def test_bad_magic_is_refused() -> None:
    soft, attest, values = _soft_quote(magic=0xFF544348)  # TPM_GENERATED_VALUE is 0xFF544347
    _refused("bad_magic", verify_quote, soft.public, attest, soft.sign(attest), b"n", values, SEL)


@pytest.mark.parametrize("cut", [1, 10, 40])
def test_truncated_attest_is_refused(cut: int) -> None:
    soft, attest, values = _soft_quote()
    attest = attest[:-cut]
    _refused("bad_attest", verify_quote, soft.public, attest, soft.sign(attest), b"n", values, SEL)


def test_trailing_bytes_after_attest_are_refused() -> None:
    soft, attest, values = _soft_quote()
    attest += b"\0"
    _refused("bad_attest", verify_quote, soft.public, attest, soft.sign(attest), b"n", values, SEL)


def test_trailing_bytes_after_signature_are_refused() -> None:
    soft, attest, values = _soft_quote()
    sig = soft.sign(attest) + b"\0"
    _refused("bad_signature", verify_quote, soft.public, attest, sig, b"n", values, SEL)


def test_soft_quote_verifies() -> None:
    # The hand-built evidence is right apart from what each negative test changes.
    soft, attest, values = _soft_quote(clock=(5, 2, 3))
    facts = verify_quote(soft.public, attest, soft.sign(attest), b"n", values, "sha256:7,1,0")
    assert (facts.clock, facts.reset_count, facts.restart_count) == (5, 2, 3)


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00", b"\x00\x00", b"\xff" * 2000],
)
def test_parse_public_refuses_garbage(data: bytes) -> None:
    _refused("bad_public", parse_public, data, what="x")


def test_parse_public_refuses_trailing_bytes_and_size_lies() -> None:
    raw = bytes(SoftAk().public.marshal())
    _refused("bad_public", parse_public, raw + b"\0", what="x")
    lie = (len(raw) - 2 + 1).to_bytes(2, "big") + raw[2:] + b"\0"
    _refused("bad_public", parse_public, lie, what="x")


# ---- certify --------------------------------------------------------------------


def _workload_key(swtpm: SwtpmInstance, tmp_path: Path, name_: str = "w") -> KeyBlob:
    with TpmKeyStore(tcti=swtpm.tcti, key_dir=tmp_path / "keys") as store:
        store.create(name_, "ES256")
        return signing_key_blob(store.key_path(name_).read_bytes())


def test_certify_of_a_key_that_is_not_fixed_tpm_is_refused(ctx: TpmContext) -> None:
    ak = create_ak(ctx)
    template = key_template(AK_ALGORITHM)
    template.objectAttributes = KEY_ATTRIBUTES & ~(TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT)
    private, public = ctx.device(lambda ectx: ctx.create(template))

    def op(ectx: Any, ak_handle: Any) -> tuple[Any, Any]:
        handle = ctx.load("loose key", SimpleNamespace(private=private, public=public))
        try:
            return ectx.certify(handle, ak_handle, b"", SCHEMES[AK_ALGORITHM])
        finally:
            ctx.flush(handle)

    attest, sig = with_ak(ctx, ak, op)
    _refused(
        "key_not_resident",
        verify_certify,
        _public(ak),
        bytes(attest.marshal())[2:],
        bytes(sig.marshal()),
        bytes(public.marshal()),
    )


def test_certify_signed_by_another_ak_is_refused(
    ctx: TpmContext, swtpm: SwtpmInstance, tmp_path: Path
) -> None:
    ak, other = create_ak(ctx), create_ak(ctx)
    key = _workload_key(swtpm, tmp_path)
    attest, sig = certify(ctx, other, key, b"")
    _refused(
        "bad_signature",
        verify_certify,
        _public(ak),
        bytes(attest.marshal())[2:],
        bytes(sig.marshal()),
        bytes(key.tss.public.marshal()),
    )


def test_certify_for_another_key_is_refused(
    ctx: TpmContext, swtpm: SwtpmInstance, tmp_path: Path
) -> None:
    ak = create_ak(ctx)
    key = _workload_key(swtpm, tmp_path, "a")
    other = _workload_key(swtpm, tmp_path, "b")
    attest, sig = certify(ctx, ak, key, b"")
    raw, s = bytes(attest.marshal())[2:], bytes(sig.marshal())
    _refused(
        "certify_name_mismatch",
        verify_certify,
        _public(ak),
        raw,
        s,
        bytes(other.tss.public.marshal()),
    )
    _refused(
        "certify_key_mismatch",
        verify_certify,
        _public(ak),
        raw,
        s,
        bytes(key.tss.public.marshal()),
        expected_key=other.public_key,
    )


def test_hand_built_certify_of_wrong_type_is_refused() -> None:
    soft = SoftAk()
    key = SoftAk()
    attest = certify_attest(name(key.public), kind=int(TPM2_ST.ATTEST_CREATION))
    _refused(
        "wrong_attest_type",
        verify_certify,
        soft.public,
        attest,
        soft.sign(attest),
        bytes(key.public.marshal()),
    )


# ---- positive ---------------------------------------------------------------------


def test_quote_verifies(ctx: TpmContext) -> None:
    ak = create_ak(ctx)
    ak_public = ak_public_checked(bytes(ak.tss.public.marshal()))
    nonce = b"\x07" * 32
    attest, sig = _quote(ctx, ak, nonce)
    facts = verify_quote(ak_public, attest, sig, nonce, _pcrs(ctx, SEL), "sha256:7,0,1")
    assert facts.pcr_selection == SEL
    assert list(facts.pcr_values) == [("sha256", 0), ("sha256", 1), ("sha256", 7)]
    assert facts.clock > 0 and facts.safe
    assert name(ak_public) == ak.name


def test_certify_verifies(ctx: TpmContext, swtpm: SwtpmInstance, tmp_path: Path) -> None:
    ak = create_ak(ctx)
    key = _workload_key(swtpm, tmp_path)
    attest, sig = certify(ctx, ak, key, b"")
    facts = verify_certify(
        _public(ak),
        bytes(attest.marshal())[2:],
        bytes(sig.marshal()),
        bytes(key.tss.public.marshal()),
        expected_key=key.public_key,
    )
    assert facts.name == key.name
    assert facts.attributes & TPMA_OBJECT.FIXEDTPM
    assert spki_sha256(public_key(facts.public)) == spki_sha256(key.public_key)


# ---- monotonic counters -----------------------------------------------------------


def _facts(clock: int, reset: int, restart: int) -> QuoteFacts:
    return QuoteFacts(clock, reset, restart, True, 0, SEL, {})


@pytest.mark.parametrize(
    "previous, current",
    [
        ((100, 5, 0), (200, 4, 9)),  # resetCount back
        ((100, 5, 3), (200, 5, 2)),  # restartCount back, same reset
        ((100, 5, 3), (99, 5, 3)),  # clock back, nothing restarted
    ],
)
def test_regressions_are_refused(
    previous: tuple[int, int, int], current: tuple[int, int, int]
) -> None:
    _refused("tpm_clock_regressed", check_monotonic, previous, _facts(*current))


@pytest.mark.parametrize(
    "previous, current",
    [
        (None, (0, 0, 0)),
        ((100, 5, 3), (100, 5, 3)),  # same quote time (two quotes within a tick)
        ((100, 5, 3), (101, 5, 3)),
        ((100, 5, 3), (10, 5, 4)),  # TPM restart: clock may go back
        ((100, 5, 3), (10, 6, 0)),  # TPM reset: restartCount back to 0
    ],
)
def test_forward_moves_are_accepted(previous: Any, current: tuple[int, int, int]) -> None:
    check_monotonic(previous, _facts(*current))


def test_spki_sha256_is_the_der_spki_hash() -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    der = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert spki_sha256(key) == hashlib.sha256(der).hexdigest()


# ---- real TPM counters and banks --------------------------------------------------


def _verified_quote(ctx: TpmContext, ak: KeyBlob, sel: str = SEL) -> QuoteFacts:
    attest, sig = _quote(ctx, ak, b"n", sel)
    values: dict[tuple[str, int], bytes] = {}
    for part in sel.split("+"):
        values.update(_pcrs(ctx, part))
    return verify_quote(_public(ak), attest, sig, b"n", values, sel)


def test_quote_after_a_tpm_reset_moves_forward_and_the_old_one_is_a_regression(
    swtpm_factory: Any,
) -> None:
    tpm = swtpm_factory()  # a TPM of its own: this test power-cycles it
    with shared_context(tpm.tcti) as c:
        ak = create_ak(c)
        before = _verified_quote(c, ak)
        later = _verified_quote(c, ak)
    check_monotonic((before.clock, before.reset_count, before.restart_count), later)
    tpm.restart()  # swtpm restarts with TPM2_Startup(CLEAR): a TPM Reset
    with shared_context(tpm.tcti) as c:
        after = _verified_quote(c, ak)
    assert after.reset_count > later.reset_count
    check_monotonic((later.clock, later.reset_count, later.restart_count), after)
    # The quote from before the reset, presented after it: refused.
    _refused(
        "tpm_clock_regressed",
        check_monotonic,
        (after.clock, after.reset_count, after.restart_count),
        later,
    )


def test_quote_over_two_banks(ctx: TpmContext) -> None:
    ak = create_ak(ctx)
    facts = _verified_quote(ctx, ak, "sha1:0,7+sha256:0,7")
    assert facts.pcr_selection == "sha1:0,7+sha256:0,7"
    assert [len(v) for v in facts.pcr_values.values()] == [20, 20, 32, 32]


def test_certify_by_another_tpms_ak_is_refused(
    ctx: TpmContext, swtpm_factory: Any, tmp_path: Path
) -> None:
    """The refusal list's "a certify statement signed by another TPM's AK": a key of a
    second TPM, certified there by that TPM's own AK, presented for this TPM's AK."""
    ours = create_ak(ctx)
    other_tpm = swtpm_factory(new_identity=True)
    key = _workload_key(other_tpm, tmp_path)
    with shared_context(other_tpm.tcti) as other_ctx:
        theirs = create_ak(other_ctx)
        attest, sig = certify(other_ctx, theirs, key, b"")
    evidence = (bytes(attest.marshal())[2:], bytes(sig.marshal()), bytes(key.tss.public.marshal()))
    verify_certify(_public(theirs), *evidence)  # a good statement, by the other TPM's AK
    _refused("bad_signature", verify_certify, _public(ours), *evidence)
