"""Hostile agents against the tpm server half (review of issue 10), on a real swtpm: the
agent may not pick the PCRs it quotes, add PCR values (selectors) no quote covers, move
a trusted EK's key into a public area of its own making, or carry an answer from one
attestation (or server) to another.  Each is a custos refusal with a stable code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from tpm2_pytss.constants import TPM2_ALG, TPMA_OBJECT
from tpm2_pytss.types import TPM2B_PUBLIC
from tpm_attestor_rig import TD, Rig, edit, ek_certificate_for, ek_hash_of

from custos.errors import CustosError
from custos.plugin.errors import PluginCallError
from custos.server.datastore import Datastore
from custos.tpm import verify
from custos_attestors.node.tpm import wire


def test_the_agent_cannot_choose_the_pcrs_it_quotes(rig: Rig) -> None:
    """The quote must cover the server's selection, not one the agent (or a man in the
    middle rewriting the challenge) picked."""
    for pcrs in ("sha256:0", "sha256:0,1,2,3,7,8", "sha1:0,1,2,3,7"):
        error = rig.refused(challenge=lambda c, p=pcrs: edit(c, pcrs=p))
        assert error.code in ("pcr_selection_mismatch", "pcr_values_mismatch"), error
    assert rig.store.tpm_nodes.get(ek_hash_of(rig)) is None


def test_the_agent_cannot_add_pcr_values_the_quote_does_not_cover(rig: Rig) -> None:
    """An extra PCR value would be an extra tpm:pcr selector: refused."""

    def extra(answer: bytes) -> bytes:
        values = json.loads(answer)["pcr_values"]
        values["sha256:8"] = "ab" * 32
        return edit(answer, pcr_values=values)

    def fewer(answer: bytes) -> bytes:
        values = json.loads(answer)["pcr_values"]
        values.pop("sha256:7")
        return edit(answer, pcr_values=values)

    assert rig.refused(answer=extra).code == "pcr_values_mismatch"
    assert rig.refused(answer=fewer).code == "pcr_values_mismatch"
    node = rig.attest()
    assert not any(s.value.startswith("pcr:sha256:8:") for s in node.selectors)


def _reshape_ek(payload: bytes, change: Any) -> bytes:
    ek = verify.parse_public(wire.decode_payload(payload).ek_public, what="ek")
    change(ek.publicArea)
    return edit(payload, ek_public=wire.b64url(bytes(TPM2B_PUBLIC.marshal(ek))))


def _set(attr: str, value: Any) -> Any:
    def change(area: Any) -> None:
        target, _, leaf = attr.rpartition(".")
        obj = area
        for part in target.split(".") if target else []:
            obj = getattr(obj, part)
        setattr(obj, leaf, value)

    return change


@pytest.mark.parametrize(
    "change",
    [
        _set("nameAlg", TPM2_ALG.SHA384),
        _set("nameAlg", TPM2_ALG.SHA512),
        _set("parameters.rsaDetail.symmetric.keyBits.aes", 256),
        _set("parameters.rsaDetail.symmetric.mode.aes", TPM2_ALG.CBC),
        _set("parameters.rsaDetail.symmetric.algorithm", TPM2_ALG.NULL),
        _set("objectAttributes", TPMA_OBJECT.DECRYPT | TPMA_OBJECT.USERWITHAUTH),
        _set("authPolicy", b""),
    ],
    ids=["sha384", "sha512", "aes256", "cbc", "no-symmetric", "unrestricted", "no-policy"],
)
def test_a_trusted_ek_key_in_a_public_area_of_the_agents_making_is_refused(
    rig: Rig, change: Any
) -> None:
    """The EK certificate binds a key, not a public area: the EK's parameters come from
    the agent.  A credential made for other parameters cannot be activated (for a SHA-384
    nameAlg swtpm answers TPM_RC_FAILURE): refused before any credential is made."""
    error = rig.refused(payload=lambda p: _reshape_ek(p, change))
    assert error.code == "ek_unusable", error
    assert not rig.challenges  # no credential was made for it
    assert rig.store.tpm_nodes.get(ek_hash_of(rig)) is None


def test_a_weak_allowlisted_ek_is_refused(rig: Rig) -> None:
    """A factorable EK proves nothing, even when an operator allowlisted its hash."""
    weak = rsa.generate_private_key(65537, 1024).public_key()

    def swap(payload: bytes) -> bytes:
        def change(area: Any) -> None:
            area.parameters.rsaDetail.keyBits = 1024
            area.unique.rsa = weak.public_numbers().n.to_bytes(128, "big")

        return edit(_reshape_ek(payload, change), ek_cert=None)

    rig.server_settings.update(ek_ca_bundle=[], ek_allowlist=[verify.spki_sha256(weak)])
    assert rig.refused(payload=swap).code == "ek_weak_key"


def test_an_ek_certificate_with_an_unknown_key_algorithm_is_refused_cleanly(rig: Rig) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate().public_key()
    der = ek_certificate_for(rig.tpm, key, with_extensions=False)
    ed25519_oid, unknown_oid = bytes.fromhex("06032b6570"), bytes.fromhex("06032b6563")
    assert der.count(ed25519_oid) == 1
    hostile = der.replace(ed25519_oid, unknown_oid)
    error = rig.refused(payload=lambda p: edit(p, ek_cert=wire.b64url(hostile)))
    assert error.code == "ek_key_mismatch"


def test_an_answer_is_good_for_its_own_challenge_only_even_across_servers(
    rig: Rig, tmp_path: Path
) -> None:
    """Two servers (two datastores here; one PostgreSQL behaves the same: the nonce
    never leaves the server's attestation): an answer captured from one attestation,
    sent to a second one at the same or another server, is refused."""
    rig.attest()
    first_answer = rig.answers[0]
    with Datastore.open(f"sqlite:///{tmp_path / 'other.db'}", trust_domain=TD) as other_store:
        other = Rig(rig.tpm, other_store, rig.tmp)
        for target in (rig, other):
            # Activation is asked again by the other server (it never saw the AK):
            # the old secret is wrong; the same server asks for a quote only, whose
            # nonce is new.
            error = target.refused(answer=lambda _new: first_answer)
            assert error.code in ("activation_failed", "nonce_mismatch"), error
            error = target.refused(answer=lambda _new: edit(first_answer, activated_secret=None))
            assert error.code in ("activation_failed", "nonce_mismatch"), error


def test_no_hostile_answer_field_is_a_plugin_crash(rig: Rig) -> None:
    """Every answer field swapped for hostile values of the right JSON type: refused
    with a custos code, never an exception that is not a CustosError."""
    hostile: list[dict[str, Any]] = [
        {"quote_attest": wire.b64url(b"\xff" * 1024)},
        {"quote_signature": wire.b64url(b"\x00\x18\x00\x0b" + b"\x00\x20" + b"\xff" * 32 * 2)},
        {"quote_signature": wire.b64url(b"\x00\x18\x00\x0b\x00\x00\x00\x00")},
        {"activated_secret": wire.b64url(b"\x00")},
        {"event_log": wire.b64url(b"x\x9c" + b"\x00" * 20)},
        {"pcr_values": {"sha512:0": "00" * 64}},
        {"v": 2},
    ]
    for change in hostile:
        with pytest.raises(PluginCallError) as info:
            rig.attest(answer=lambda a, c=change: edit(a, **c))
        assert isinstance(info.value.__cause__, CustosError), (change, info.value)


def test_the_agent_id_is_the_activated_eks_hash_only(rig: Rig) -> None:
    node = rig.attest()
    ek_hash = ek_hash_of(rig)
    assert str(node.agent_id) == f"spiffe://{TD}/custos/agent/tpm/{ek_hash}"
    # Nothing the agent sends names the agent: the payload has no field for it.
    assert set(json.loads(rig.payloads[0])) <= {
        "v", "ek_profile", "ek_public", "ek_cert", "ek_intermediates", "ak_public"
    }  # fmt: skip
    error = rig.refused(payload=lambda p: edit(p, agent_id="spiffe://example.org/x"))
    assert error.code == "tpm_evidence_invalid"


def _reshape_ak(payload: bytes, change: Any) -> bytes:
    ak = verify.parse_public(wire.decode_payload(payload).ak_public, what="ak")
    change(ak.publicArea)
    return edit(payload, ak_public=wire.b64url(bytes(TPM2B_PUBLIC.marshal(ak))))


@pytest.mark.parametrize(
    ("change", "code"),
    [
        (lambda a: setattr(a, "objectAttributes", a.objectAttributes & ~TPMA_OBJECT.FIXEDTPM),
         "ak_not_restricted"),
        (lambda a: setattr(a, "objectAttributes", a.objectAttributes & ~TPMA_OBJECT.FIXEDPARENT),
         "ak_not_restricted"),
        (lambda a: setattr(a, "objectAttributes", a.objectAttributes | TPMA_OBJECT.DECRYPT),
         "ak_not_restricted"),
        (lambda a: setattr(a, "nameAlg", TPM2_ALG.SHA384), "ak_bad_algorithm"),
        (lambda a: setattr(a.parameters.eccDetail.scheme.details.ecdsa, "hashAlg",
                           TPM2_ALG.SHA384), "ak_bad_algorithm"),
        (lambda a: setattr(a.parameters.eccDetail.scheme, "scheme", TPM2_ALG.ECSCHNORR),
         "ak_bad_algorithm"),
    ],
    ids=["not-fixedtpm", "not-fixedparent", "decrypt", "sha384-name", "sha384-scheme", "schnorr"],
)  # fmt: skip
def test_an_ak_that_is_not_a_fixed_p256_signing_key_is_refused(
    rig: Rig, change: Any, code: str
) -> None:
    assert rig.refused(payload=lambda p: _reshape_ak(p, change)).code == code
    assert not rig.challenges


def test_an_ak_file_that_cannot_be_read_or_written_is_a_clear_agent_error(rig: Rig) -> None:
    """A bad ak_file path (under a regular file; a directory) stops the agent half with a
    custos error naming the setting, not an OSError from deep inside."""
    (rig.tmp / "plain").write_text("x")
    # /proc refuses new directories even to root: the AK is made, then cannot be saved.
    unwritable = Path("/proc/custos-no-such-dir/ak.pem")
    for path in (rig.tmp / "plain" / "ak.pem", rig.tmp, unwritable):
        with pytest.raises(CustosError) as info:
            _attest_with(rig, ak_file=str(path))
        assert "ak_file" in info.value.message, info.value.message


def _attest_with(rig: Rig, **agent_settings: Any) -> None:
    import asyncio

    async def run() -> None:
        with rig.server() as server, rig.agent(**agent_settings) as agent:
            await rig.exchange(server, agent)

    asyncio.run(run())


def test_a_clock_set_past_what_the_datastore_holds_is_refused_cleanly(own_rig: Rig) -> None:
    """TPM2_ClockSet (owner auth) can move the TPM's clock to almost 2^64 ms; a quote
    saying so is refused with a custos code, never a database overflow (own TPM: its
    clock only ever moves forward)."""
    from tpm2_pytss.constants import ESYS_TR

    from custos.tpm.context import shared_context

    with shared_context(own_rig.tpm.tcti) as ctx:
        ctx.device(lambda ectx: ectx.clock_set(2**63 + 10**6, ESYS_TR.OWNER))
    error = own_rig.refused()
    assert error.code == "invalid_tpm_clock", error


def test_an_ecc_p256_ek_attests_through_the_allowlist(rig: Rig) -> None:
    """The template check (decision 0080) accepts the TPM's own ECC P-256 EK: swtpm has
    no certificate for it, so its hash is allowlisted."""
    from custos.tpm.activation import ek_public_area
    from custos.tpm.context import shared_context

    with shared_context(rig.tpm.tcti) as ctx:
        ek = ek_public_area(ctx, "ecc-p256")
    ek_hash = verify.spki_sha256(verify.public_key(ek))
    rig.server_settings.update(ek_ca_bundle=[], ek_allowlist=[ek_hash])
    rig.agent_settings["ek_profile"] = "ecc-p256"
    node = rig.attest()
    assert str(node.agent_id) == f"spiffe://{TD}/custos/agent/tpm/{ek_hash}"
    assert wire.decode_payload(rig.payloads[-1]).ek_profile == "ecc-p256"


def test_the_p384_ek_attests_through_its_certificate(rig: Rig) -> None:
    """swtpm's high-range ECC P-384 EK (certificate at 0x01c00016, PolicyOR activation)."""
    from cryptography import x509

    rig.agent_settings["ek_profile"] = "ecc-p384"
    node = rig.attest()
    sent = wire.decode_payload(rig.payloads[-1])
    assert sent.ek_profile == "ecc-p384" and sent.ek_cert is not None
    cert = x509.load_der_x509_certificate(sent.ek_cert)
    assert cert.public_key().curve.name == "secp384r1"  # type: ignore[union-attr]
    ek_hash = verify.spki_sha256(cert.public_key())
    assert str(node.agent_id) == f"spiffe://{TD}/custos/agent/tpm/{ek_hash}"
    assert wire.decode_challenge(rig.challenges[-1]).activation is True
    assert "ek_issuer:swtpm-localca" in {s.value for s in node.selectors}
