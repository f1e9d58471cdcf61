"""Hypothesis on the parsers of TPM structures: TPM2B_PUBLIC, TPMS_ATTEST (quote and
certify, validly signed so the parser after the signature is reached), TPMT_SIGNATURE
and TCG2 event logs.  No exception but AttestationEvidenceError; anything accepted is
exactly a well-formed structure (it re-marshals to the same bytes)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tpm2_pytss.constants import TPMA_OBJECT
from tpm2_pytss.types import TPM2B_PUBLIC, TPMS_ATTEST
from tpm_forge import SoftAk, certify_attest, pcr_digest, quote_attest

from custos.tpm.eventlog import Event, encode_event_log, parse_event_log, replay
from custos.tpm.verify import (
    AttestationEvidenceError,
    name,
    parse_public,
    verify_certify,
    verify_quote,
)

SEL = "sha256:0,1,7"
AK = SoftAk()
KEY = SoftAk()
VALUES = {("sha256", i): hashlib.sha256(bytes([i])).digest() for i in (0, 1, 7)}
QUOTE = quote_attest(b"nonce", SEL, pcr_digest(list(VALUES.values())))
CERTIFY = certify_attest(name(KEY.public))
AK_PUBLIC = bytes(AK.public.marshal())
EK_LIKE = bytes(
    TPM2B_PUBLIC.from_pem(
        rsa.generate_private_key(65537, 2048)
        .public_key()
        .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo),
        objectAttributes=TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT | TPMA_OBJECT.FIXEDTPM,
    ).marshal()
)
LOG = encode_event_log(
    [
        Event(0, 1, {"sha1": bytes(20), "sha256": bytes(32)}, b"bios"),
        Event(7, 4, {"sha1": b"\1" * 20, "sha256": b"\1" * 32}, b"\0\0\0\0"),
    ],
    ["sha1", "sha256"],
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """``base`` with a few byte edits: flip, set, delete, insert, truncate, extend."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "delete", "insert", "truncate", "extend"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[at] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]))
        elif op == "delete" and data:
            del data[at]
        elif op == "insert":
            data.insert(at, draw(st.integers(0, 255)))
        elif op == "truncate":
            del data[at:]
        elif op == "extend":
            data += draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


def _only_evidence_errors(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except AttestationEvidenceError:
        return None


def test_the_seeds_are_valid() -> None:
    assert parse_public(EK_LIKE, what="seed") and parse_public(AK_PUBLIC, what="seed")
    verify_quote(AK.public, QUOTE, AK.sign(QUOTE), b"nonce", VALUES, SEL)
    verify_certify(AK.public, CERTIFY, AK.sign(CERTIFY), bytes(KEY.public.marshal()))
    assert len(parse_event_log(LOG)) == 3


@FUZZ
@given(st.one_of(st.binary(max_size=600), mutated(AK_PUBLIC), mutated(EK_LIKE)))
def test_parse_public(data: bytes) -> None:
    public = _only_evidence_errors(lambda: parse_public(data, what="fuzz"))
    if public is not None:
        assert bytes(public.marshal()) == data


@FUZZ
@given(st.one_of(mutated(QUOTE), st.binary(max_size=300)))
def test_quote_attest(attest: bytes) -> None:
    sig = AK.sign(attest)
    facts = _only_evidence_errors(
        lambda: verify_quote(AK.public, attest, sig, b"nonce", VALUES, SEL)
    )
    if facts is not None:
        parsed, used = TPMS_ATTEST.unmarshal(attest)
        assert used == len(attest) and bytes(parsed.marshal()) == attest
        assert bytes(parsed.extraData) == b"nonce"


@FUZZ
@given(mutated(CERTIFY))
def test_certify_attest(attest: bytes) -> None:
    sig = AK.sign(attest)
    key = bytes(KEY.public.marshal())
    facts = _only_evidence_errors(lambda: verify_certify(AK.public, attest, sig, key))
    if facts is not None:
        parsed, used = TPMS_ATTEST.unmarshal(attest)
        assert used == len(attest) and bytes(parsed.marshal()) == attest
        assert facts.name == name(KEY.public)


@FUZZ
@given(st.one_of(mutated(AK.sign(QUOTE)), st.binary(max_size=200)))
def test_signature(signature: bytes) -> None:
    facts = _only_evidence_errors(
        lambda: verify_quote(AK.public, QUOTE, signature, b"nonce", VALUES, SEL)
    )
    if facts is not None:  # another valid encoding of a valid signature (r, s unchanged)
        assert facts.pcr_selection == SEL


@FUZZ
@given(st.one_of(mutated(LOG), st.binary(max_size=400)))
def test_event_log(data: bytes) -> None:
    events = _only_evidence_errors(lambda: parse_event_log(data))
    if events is not None:
        assert events[0].data.startswith(b"Spec ID Event03")
        for event in events[1:]:
            assert 0 <= event.pcr < 24
            _only_evidence_errors(lambda e=event: replay([e], "sha256"))


def _some_cert_der() -> bytes:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "ca")]))
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(Encoding.DER)


CERT = _some_cert_der()


@FUZZ
@given(st.one_of(mutated(CERT), st.binary(max_size=300)))
def test_ek_certificate_loading(data: bytes) -> None:
    from custos.tpm.ekcert import load_ek_certificate

    cert = _only_evidence_errors(lambda: load_ek_certificate(data))
    if cert is not None:  # only the certificate itself, or it plus NV padding
        der = cert.public_bytes(Encoding.DER)
        assert data.startswith(der)
        assert data[len(der) :].strip(b"\0") == b"" or data[len(der) :].strip(b"\xff") == b""


def _ek_chain() -> tuple[Any, bytes, Any, Any]:
    """A CA and an EK certificate it issued for an RSA-2048 key (the trust check's input)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "EK CA")])
    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now - day)
        .not_valid_after(now + day)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    ek_key = rsa.generate_private_key(65537, 2048).public_key()
    ek = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_name)
        .public_key(ek_key)
        .serial_number(2)
        .not_valid_before(now - day)
        .not_valid_after(now + day)
        .sign(ca_key, hashes.SHA256())
    )
    return ca, ek.public_bytes(Encoding.DER), ek_key, ca.public_bytes(Encoding.DER)


EK_CA, EK_CERT, EK_KEY, EK_CA_DER = _ek_chain()


@FUZZ
@given(mutated(EK_CERT), st.one_of(st.none(), mutated(EK_CA_DER)))
def test_ek_trust_of_mutated_certificates(ek_der: bytes, intermediate: bytes | None) -> None:
    """The whole trust check on byte-edited EK (and intermediate) certificates: a custos
    refusal, or the certificate still binds the EK's key and chains to the CA.  (An
    unknown key algorithm OID once escaped as UnsupportedAlgorithm.)"""
    from custos.tpm.ekcert import EkTrust, load_ek_certificate

    trust = EkTrust([EK_CA], frozenset())

    def check() -> Any:
        cert = load_ek_certificate(ek_der)
        chain = [load_ek_certificate(intermediate)] if intermediate is not None else []
        return trust.check(EK_KEY, cert, chain)

    verdict = _only_evidence_errors(check)
    if verdict is not None:
        assert verdict.via == "certificate" and verdict.issuer_cn == "EK CA"
