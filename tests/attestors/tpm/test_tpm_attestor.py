"""The tpm node attestor pair on a real swtpm (EK certificates from swtpm_localca), loaded
by name through the real catalogs and entry points, against a real datastore.

The halves are driven directly: the agent half's flow (its catalog's plugin) answers the
challenges the server half (through ServerCatalog.attest_node) sends, and a test may
tamper with any message in between.  Tests that extend PCRs use a TPM of their own.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import logging
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from tpm2_pytss.constants import TPMA_OBJECT
from tpm2_pytss.types import TPM2B_PUBLIC
from tpm_attestor_rig import TD, Rig, edit, ek_certificate_for, ek_hash_of, extend, read_pcr

from custos.errors import CustosError
from custos.plugin import NodeAttestationResult
from custos.plugin.errors import PluginCallError
from custos.tpm import verify
from custos_attestors.node.tpm import wire

# ---- the happy path first, so that the refusals below mean something --------------


def test_a_tpm_attests_the_agent_named_after_its_ek(rig: Rig) -> None:
    result = rig.attest()
    ek_hash = ek_hash_of(rig)
    assert str(result.agent_id) == f"spiffe://{TD}/custos/agent/tpm/{ek_hash}"
    assert result.plugin == "tpm" and result.can_reattest is True
    values = {s.value for s in result.selectors}
    assert {s.type for s in result.selectors} == {"tpm"}
    assert f"ek_pubhash:{ek_hash}" in values
    assert "ek_issuer:swtpm-localca" in values  # the CN of swtpm_localca's issuer
    assert "manufacturer:id:00001014" in values  # swtpm says IBM in the EK cert's SAN
    assert {v.rsplit(":", 1)[0] for v in values if v.startswith("pcr:")} == {
        f"pcr:sha256:{i}" for i in (0, 1, 2, 3, 7)
    }
    # The AK was activated: the server got a credential answered.
    challenge = wire.decode_challenge(rig.challenges[0])
    assert challenge.activation and len(challenge.nonce) == 32
    ak = verify.ak_public_checked(result.attestation_key)
    node = rig.store.tpm_nodes.get(ek_hash)
    assert node is not None and node.ak_public == result.attestation_key
    assert verify.name(ak)
    assert (rig.tmp / "ak.pem").stat().st_mode & 0o777 == 0o600


def test_a_known_ak_re_attests_with_a_quote_only(rig: Rig) -> None:
    first = rig.attest()
    second = rig.attest()  # the same ak_file: the same AK
    assert second.agent_id == first.agent_id
    assert second.attestation_key == first.attestation_key
    assert wire.decode_challenge(rig.challenges[1]).activation is False
    assert wire.decode_answer(rig.answers[1]).activated_secret is None
    # A new AK for the same EK is activated again.
    (rig.tmp / "ak.pem").unlink()
    third = rig.attest()
    assert third.attestation_key != first.attestation_key
    assert wire.decode_challenge(rig.challenges[2]).activation is True


def test_an_ek_on_the_allowlist_attests_without_a_ca(rig: Rig) -> None:
    rig.server_settings.update(ek_ca_bundle=[], ek_allowlist=[ek_hash_of(rig)])
    values = {s.value for s in rig.attest().selectors}
    assert f"ek_pubhash:{ek_hash_of(rig)}" in values
    assert not any(v.startswith("ek_issuer:") for v in values)  # not trusted through a cert


def test_the_agent_sends_intermediates_the_server_bundle_lacks(rig: Rig) -> None:
    """The server trusts only the swtpm root; the agent ships the issuing CA."""
    state = rig.tpm.state
    rig.server_settings["ek_ca_bundle"] = [str(state.root_cert)]
    assert rig.refused().code == "ek_untrusted"
    rig.agent_settings["ek_intermediates"] = [str(state.issuer_cert)]
    result = rig.attest()
    assert len(wire.decode_payload(rig.payloads[-1]).ek_intermediates) == 1
    assert any(s.value.startswith("ek_issuer:") for s in result.selectors)


def test_intermediates_in_the_tpms_ek_chain_nv_indices_are_sent(own_rig: Rig) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPMA_NV
    from tpm2_pytss.types import TPM2B_AUTH, TPM2B_NV_PUBLIC, TPMS_NV_PUBLIC

    from custos.tpm.context import shared_context

    rig = own_rig
    state = rig.tpm.state
    issuer = x509.load_pem_x509_certificate(state.issuer_cert.read_bytes())
    der = issuer.public_bytes(Encoding.DER)
    padded = der + b"\xff" * 16  # NV indices are often larger than what they hold

    def provision(ectx: Any) -> None:
        attributes = TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | TPMA_NV.AUTHREAD | TPMA_NV.NO_DA
        public = TPMS_NV_PUBLIC(
            nvIndex=0x01C00100, nameAlg=TPM2_ALG.SHA256, attributes=attributes,
            dataSize=len(padded),
        )  # fmt: skip
        handle = ectx.nv_define_space(TPM2B_AUTH(), TPM2B_NV_PUBLIC(nvPublic=public))
        for offset in range(0, len(padded), 512):
            ectx.nv_write(handle, padded[offset : offset + 512], offset, ESYS_TR.OWNER)
        ectx.tr_close(handle)

    with shared_context(rig.tpm.tcti) as ctx:
        ctx.device(provision)
    rig.server_settings["ek_ca_bundle"] = [str(state.root_cert)]
    result = rig.attest()
    assert wire.decode_payload(rig.payloads[-1]).ek_intermediates == (der,)
    assert any(s.value.startswith("ek_issuer:") for s in result.selectors)


def test_a_tpm_without_an_ek_certificate_attests_through_the_allowlist_only(rig: Rig) -> None:
    def no_cert(payload: bytes) -> bytes:
        return edit(payload, ek_cert=None)

    error = rig.refused(payload=no_cert)
    assert error.code == "ek_untrusted" and "no EK certificate" in error.message
    rig.server_settings["ek_allowlist"] = [ek_hash_of(rig)]
    values = {s.value for s in rig.attest(payload=no_cert).selectors}
    assert f"ek_pubhash:{ek_hash_of(rig)}" in values
    assert not any(v.startswith(("ek_issuer:", "manufacturer:")) for v in values)


def test_a_quote_over_two_banks_and_many_pcrs(rig: Rig) -> None:
    """More PCRs than one TPM2_PCR_Read returns (8), in two banks."""
    rig.server_settings["pcrs"] = "sha1:0,7+sha256:" + ",".join(map(str, range(12)))
    values = {s.value for s in rig.attest().selectors}
    pcrs = {v.rsplit(":", 1)[0] for v in values if v.startswith("pcr:")}
    assert pcrs == {"pcr:sha1:0", "pcr:sha1:7"} | {f"pcr:sha256:{i}" for i in range(12)}
    assert wire.decode_challenge(rig.challenges[0]).pcrs.keys()[:2] == [("sha1", 0), ("sha1", 7)]


def test_a_garbled_ek_certificate_in_nv_is_not_sent_and_the_allowlist_decides(
    own_rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPMA_NV
    from tpm2_pytss.types import TPM2B_AUTH, TPM2B_NV_PUBLIC, TPMS_NV_PUBLIC

    from custos.tpm.context import shared_context

    rig = own_rig
    ek_hash = ek_hash_of(rig)
    garbage = b"\x30\x82\x01\x00" + b"not a certificate" * 10

    def garble(ectx: Any) -> None:
        # swtpm_setup wrote the certificate under the platform hierarchy (empty auth
        # after every startup): replace it with an index the owner writes.
        ectx.nv_undefine_space(ectx.tr_from_tpmpublic(0x01C00002), ESYS_TR.PLATFORM)
        public = TPMS_NV_PUBLIC(
            nvIndex=0x01C00002, nameAlg=TPM2_ALG.SHA256,
            attributes=TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | TPMA_NV.AUTHREAD | TPMA_NV.NO_DA,
            dataSize=len(garbage),
        )  # fmt: skip
        handle = ectx.nv_define_space(TPM2B_AUTH(), TPM2B_NV_PUBLIC(nvPublic=public))
        ectx.nv_write(handle, garbage, 0, ESYS_TR.OWNER)
        ectx.tr_close(handle)

    with shared_context(rig.tpm.tcti) as ctx:
        ctx.device(garble)
    caplog.set_level(logging.WARNING)
    assert rig.refused().code == "ek_untrusted"
    assert "sending no EK certificate" in caplog.text
    assert wire.decode_payload(rig.payloads[-1]).ek_cert is None
    rig.server_settings["ek_allowlist"] = [ek_hash]
    assert str(rig.attest().agent_id).endswith(ek_hash)


def test_two_attestations_never_share_a_nonce(rig: Rig) -> None:
    for _ in range(3):
        rig.attest()
    nonces = [wire.decode_challenge(c).nonce for c in rig.challenges]
    assert len(set(nonces)) == 3 and all(len(n) == 32 for n in nonces)


# ---- refusals: the EK ------------------------------------------------------------


def _ca(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def test_an_ek_certificate_from_an_unknown_ca_is_refused(rig: Rig) -> None:
    other, _ = _ca("Another TPM Vendor CA")
    path = rig.tmp / "other-ca.pem"
    path.write_bytes(other.public_bytes(serialization.Encoding.PEM))
    rig.server_settings["ek_ca_bundle"] = [str(path)]
    error = rig.refused()
    assert error.code == "ek_untrusted"
    assert not rig.challenges  # refused before any challenge


def test_an_ek_certificate_whose_key_is_not_the_ek_is_refused(rig: Rig) -> None:
    # A certificate the trusted swtpm CA really issued, but for another RSA key.
    other = rsa.generate_private_key(65537, 2048).public_key()
    der = ek_certificate_for(rig.tpm, other, with_extensions=True)
    error = rig.refused(payload=lambda p: edit(p, ek_cert=wire.b64url(der)))
    assert error.code == "ek_key_mismatch"


def test_an_ek_not_on_the_allowlist_is_refused(rig: Rig) -> None:
    rig.server_settings.update(ek_ca_bundle=[], ek_allowlist=["00" * 32])
    assert rig.refused().code == "ek_untrusted"


# ---- refusals: the AK and the activation ---------------------------------------------


def test_an_ak_that_is_not_restricted_is_refused(rig: Rig) -> None:
    def unrestrict(payload: bytes) -> bytes:
        ak = verify.parse_public(wire.decode_payload(payload).ak_public, what="ak")
        ak.publicArea.objectAttributes &= ~TPMA_OBJECT.RESTRICTED
        return edit(payload, ak_public=wire.b64url(bytes(TPM2B_PUBLIC.marshal(ak))))

    assert rig.refused(payload=unrestrict).code == "ak_not_restricted"


def test_a_wrong_activation_answer_is_refused(rig: Rig) -> None:
    def wrong(answer: bytes) -> bytes:
        secret = wire.decode_answer(answer).activated_secret
        assert secret is not None
        return edit(answer, activated_secret=wire.b64url(bytes(b ^ 1 for b in secret)))

    assert rig.refused(answer=wrong).code == "activation_failed"
    assert rig.store.tpm_nodes.get(ek_hash_of(rig)) is None  # nothing recorded
    missing = rig.refused(answer=lambda a: edit(a, activated_secret=None))
    assert missing.code == "activation_failed"


def test_an_ak_of_another_tpm_cannot_activate(rig: Rig, swtpm_factory: Any) -> None:
    """The payload names this TPM's EK but an AK of another TPM: the credential is
    encrypted to this EK, so the other TPM (holding the AK) cannot activate it."""
    other = Rig(swtpm_factory(new_identity=True), rig.store, rig.tmp / "other")
    other.tmp.mkdir()

    async def run() -> None:
        with rig.server() as server, other.agent() as liar, rig.agent() as honest:
            flow = honest.node_attestor.plugin.attestation_flow()
            ek = wire.decode_payload(await anext(flow))
            await flow.aclose()
            await rig.exchange(
                server,
                liar,
                payload=lambda p: edit(
                    p, ek_public=wire.b64url(ek.ek_public), ek_cert=wire.b64url(ek.ek_cert or b"")
                ),
            )

    with pytest.raises(CustosError) as info:
        asyncio.run(run())
    assert info.value.code == "activation_failed"  # the liar's TPM refused it
    assert rig.store.tpm_nodes.get(ek_hash_of(rig)) is None


# ---- refusals: the quote ------------------------------------------------------------


def test_a_quote_replayed_with_an_old_nonce_is_refused(rig: Rig) -> None:
    rig.attest()
    old = rig.answers[0]
    error = rig.refused(answer=lambda _new: edit(old, activated_secret=None))
    assert error.code == "nonce_mismatch"


def test_a_quote_whose_pcr_digest_differs_from_the_reported_values_is_refused(rig: Rig) -> None:
    def lie(answer: bytes) -> bytes:
        values = json.loads(answer)["pcr_values"]
        values["sha256:7"] = "ff" * 32
        return edit(answer, pcr_values=values)

    assert rig.refused(answer=lie).code == "pcr_digest_mismatch"
    assert rig.store.tpm_nodes.get(ek_hash_of(rig)) is None


def test_an_answer_to_an_expired_challenge_is_refused(rig: Rig) -> None:
    rig.server_settings["challenge_ttl"] = "1s"
    assert rig.refused(delay=1.2).code == "challenge_expired"


def test_a_clock_or_reset_count_behind_the_stored_state_is_refused(rig: Rig) -> None:
    rig.attest()
    ek_hash = ek_hash_of(rig)
    node = rig.store.tpm_nodes.get(ek_hash)
    assert node is not None
    # The stored state is ahead of what the TPM will quote: a rolled-back TPM.
    for clock, reset in ((node.clock + 10**9, node.reset_count), (0, node.reset_count + 1)):
        rig.store.tpm_nodes.record(ek_hash, node.ak_public, clock, reset, node.restart_count)
        assert rig.refused().code == "tpm_clock_regressed"
    # A newly activated AK starts a new baseline: the TPM obfuscates resetCount and
    # restartCount per AK, so another AK's counters say nothing about this one's.
    rig.store.tpm_nodes.record(ek_hash, b"another AK", 2**40, 2**31, 2**31)
    assert rig.attest().agent_id
    assert wire.decode_challenge(rig.challenges[-1]).activation is True


# ---- PCR policy and event logs (a TPM of the test's own) -----------------------------


def test_a_node_whose_pcrs_leave_the_policy_is_refused_and_counted(
    own_rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig = own_rig
    rig.server_settings["pcr_policy"] = [
        {
            "name": "fleet",
            "match": [f"tpm:ek_pubhash:{ek_hash_of(rig)}"],
            "pcrs": {"sha256:7": [read_pcr(rig.tpm, "sha256", 7).hex()]},
        }
    ]

    async def run() -> tuple[NodeAttestationResult, CustosError, int]:
        with rig.server() as server, rig.agent() as agent:
            ok = await rig.exchange(server, agent)
            extend(rig.tpm, 7, b"an unexpected boot component")
            with pytest.raises(PluginCallError) as info:
                await rig.exchange(server, agent)
            cause = info.value.__cause__
            assert isinstance(cause, CustosError)
            count = server.node_attestors["tpm"].plugin.policy_refusals  # type: ignore[attr-defined]
            return ok, cause, count

    caplog.set_level(logging.WARNING)
    ok, error, count = asyncio.run(run())
    assert ok.agent_id
    assert error.code == "pcr_policy"
    assert count == 1
    assert "outside the PCR policy" in caplog.text and "sha256:7" in caplog.text


# ---- key residency: the agent half as KeyCertifier -----------------------------------


def test_the_agent_half_certifies_a_tpm_store_key_with_its_ak(rig: Rig) -> None:
    from custos.keys.tpm import TpmKeyStore
    from custos.plugin.protocols import KeyCertifier

    keys = TpmKeyStore(tcti=rig.tpm.tcti, key_dir=rig.tmp / "keys")
    try:
        keys.create("workload-a", "ES256")
        path = str(keys.key_path("workload-a"))
        with rig.agent() as agent:
            plugin = agent.node_attestor.plugin
            assert isinstance(plugin, KeyCertifier)
            assert plugin.certify_key("workload-a", path) is None  # no AK before attesting
            with rig.server() as server:
                result = asyncio.run(rig.exchange(server, agent))
            evidence = plugin.certify_key("workload-a", path)
        assert evidence is not None
        attest, signature, tpm_public = evidence
        facts = verify.verify_certify(
            verify.ak_public_checked(result.attestation_key),
            attest,
            signature,
            tpm_public,
            expected_key=keys.get("workload-a").public_key(),
        )
        assert facts.attributes & TPMA_OBJECT.FIXEDTPM
    finally:
        keys.close()


# ---- configuration -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"colour": "blue"}, "unknown tpm settings"),
        ({"ek_profile": "rsa4096"}, "ek_profile"),
        ({"ak_file": "relative/ak.pem"}, "absolute"),
        ({"event_log_file": ""}, "absolute"),
        ({"ek_intermediates": "/etc/ca.pem"}, "list"),
        ({"ek_intermediates": ["/nonexistent/ca.pem"]}, "does not exist"),
        ({"tcti": "cmd:/bin/sh"}, "not allowed"),
    ],
)
def test_invalid_agent_settings_fail_the_load(
    rig: Rig, settings: dict[str, object], message: str
) -> None:
    with pytest.raises(PluginCallError, match=message):
        rig.agent(**settings)


def test_the_server_half_needs_a_datastore_and_a_way_to_trust_an_ek(rig: Rig) -> None:
    from custos.plugin import PluginConfig, ServerCatalog

    with pytest.raises(PluginCallError, match="Datastore"):
        ServerCatalog.load(TD, node_attestors=[PluginConfig("tpm", {"ek_allowlist": []})])
    with pytest.raises(PluginCallError, match="trusts no EK"):
        rig.server(ek_ca_bundle=[])


def test_an_unreadable_event_log_is_not_sent_and_warned_about_once(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig.agent_settings["event_log_file"] = str(rig.tmp / "no-such-log")
    caplog.set_level(logging.WARNING)
    rig.attest()
    assert wire.decode_answer(rig.answers[0]).event_log is None
    assert caplog.text.count("not sending the event log") == 1


# ---- hostile evidence, fuzzed ---------------------------------------------------------

_PAYLOAD_FIELDS = ["ek_public", "ek_cert", "ak_public"]
_ANSWER_FIELDS = ["quote_attest", "quote_signature", "pcr_values"]


def _flip(message: bytes, name: str, position: int, bit: int) -> bytes:
    data = json.loads(message)
    if name == "pcr_values":
        key = sorted(data[name])[position % len(data[name])]
        raw = bytearray(bytes.fromhex(data[name][key]))
        raw[position % len(raw)] ^= 1 << bit
        data[name][key] = raw.hex()
    else:
        text = data[name]
        raw = bytearray(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        raw[position % len(raw)] ^= 1 << bit
        data[name] = wire.b64url(bytes(raw))
    return json.dumps(data).encode()


def test_evidence_with_any_bit_flipped_is_refused_or_names_the_same_node(rig: Rig) -> None:
    """Every field the server checks, one bit flipped anywhere: a clean refusal (a custos
    error, on either side), or (a bit the checks do not depend on, e.g. in the EK's
    authPolicy) the very same agent; never another identity, never a crash."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    baseline = rig.attest()
    outcomes: dict[str, int] = {"refused": 0, "same": 0}

    @settings(
        max_examples=60,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        field=st.sampled_from(_PAYLOAD_FIELDS + _ANSWER_FIELDS),
        position=st.integers(0, 4096),
        bit=st.integers(0, 7),
    )
    def flip(field: str, position: int, bit: int) -> None:
        def mutate(message: bytes) -> bytes:
            return _flip(message, field, position, bit)

        transform = {"payload": mutate} if field in _PAYLOAD_FIELDS else {"answer": mutate}

        async def run() -> NodeAttestationResult:
            with rig.server() as server, rig.agent() as agent:
                return await rig.exchange(server, agent, **transform)

        try:
            result = asyncio.run(run())
        except PluginCallError as e:
            assert isinstance(e.__cause__, CustosError), repr(e.__cause__)
            outcomes["refused"] += 1
        except CustosError:  # the agent's TPM refused the tampered challenge
            outcomes["refused"] += 1
        else:
            assert result.agent_id == baseline.agent_id
            assert result.attestation_key == baseline.attestation_key
            outcomes["same"] += 1

    flip()
    assert outcomes["refused"] > 0


def test_attestation_and_re_attestation_on_postgresql(
    swtpm: Any, postgres_db: str, tmp_path: Any
) -> None:
    from custos.server.datastore import Datastore

    with Datastore.open(postgres_db, trust_domain=TD) as store:
        rig = Rig(swtpm, store, tmp_path)
        first = rig.attest()
        second = rig.attest()
        assert second.agent_id == first.agent_id
        assert wire.decode_challenge(rig.challenges[1]).activation is False
        node = store.tpm_nodes.get(ek_hash_of(rig))
        assert node is not None and node.ak_public == first.attestation_key
