"""custos.tpm.ekcert: EK trust by certificate (swtpm_localca-issued and hand-built) or
allowlist.  docs/tpm-ek-certificates.md lists which test shows which check."""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from custos.testing.swtpm import SwtpmInstance
from custos.tpm.ekcert import (
    TCG_AT_TPM_MANUFACTURER,
    EkTrust,
    load_ek_certificate,
    manufacturer_of,
)
from custos.tpm.verify import AttestationEvidenceError, spki_sha256

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)
TCG_EK_EKU = x509.ObjectIdentifier("2.23.133.8.1")


def _name(cn: str) -> x509.Name:
    # Over 64 characters is out of X.509's bounds: built unchecked, as a hostile CA would.
    attr = x509.NameAttribute(NameOID.COMMON_NAME, cn, _validate=len(cn) <= 64)
    return x509.Name([attr]) if cn else x509.Name([])


class Ca:
    """A test CA: root or intermediate, signing EK-like certificates."""

    def __init__(self, cn: str, parent: Ca | None = None, **kw: Any) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = _name(cn)
        # No parent: self-signed (a root).
        self.cert = _issue(parent or self, self.name, self.key.public_key(), ca=True, **kw)


def _issue(
    signer: Ca,
    subject: x509.Name,
    key: Any,
    *,
    ca: bool = False,
    not_before: datetime.datetime = NOW - DAY,
    not_after: datetime.datetime = NOW + 365 * DAY,
    san_critical: bool = True,
    manufacturer: str | None = "id:49424D00",
    extra: list[tuple[x509.ExtensionType, bool]] = (),  # type: ignore[assignment]
    key_usage: x509.KeyUsage | None = None,
    eku: bool = True,
    hash_alg: Any = None,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer.name)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            key_usage
            or x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
    else:
        if manufacturer is not None:
            dir_name = x509.Name(
                [
                    x509.NameAttribute(TCG_AT_TPM_MANUFACTURER, manufacturer),
                    x509.NameAttribute(x509.ObjectIdentifier("2.23.133.2.2"), "test"),
                    x509.NameAttribute(x509.ObjectIdentifier("2.23.133.2.3"), "id:00010002"),
                ]
            )
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DirectoryName(dir_name)]), critical=san_critical
            )
        if eku:
            builder = builder.add_extension(x509.ExtendedKeyUsage([TCG_EK_EKU]), critical=False)
    for ext, critical in extra:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(signer.key, hash_alg or hashes.SHA256())


def _ek_key() -> rsa.RSAPublicKey:
    return rsa.generate_private_key(65537, 2048).public_key()


@pytest.fixture(scope="module")
def root() -> Ca:
    return Ca("Test TPM Root")


@pytest.fixture(scope="module")
def inter(root: Ca) -> Ca:
    return Ca("Test TPM Issuing CA", parent=root)


def _ek_cert(inter: Ca, key: Any, **kw: Any) -> x509.Certificate:
    return _issue(inter, x509.Name([]), key, **kw)


def _refused(code: str, trust: EkTrust, *args: Any, **kw: Any) -> AttestationEvidenceError:
    with pytest.raises(AttestationEvidenceError) as info:
        trust.check(*args, **kw)
    assert info.value.code == code, info.value
    return info.value


# ---- strict ---------------------------------------------------------------------


def test_ek_cert_from_an_unknown_ca_is_refused(root: Ca, inter: Ca) -> None:
    key = _ek_key()
    other_root = Ca("Other Root")
    other = Ca("Other Issuing CA", parent=other_root)
    cert = _ek_cert(other, key)
    _refused("ek_untrusted", EkTrust([root.cert], frozenset()), key, cert, [other.cert])


def test_ek_cert_for_another_key_is_refused_even_if_allowlisted(inter: Ca, root: Ca) -> None:
    key, other = _ek_key(), _ek_key()
    cert = _ek_cert(inter, other)
    trust = EkTrust([root.cert], frozenset({spki_sha256(key)}))
    _refused("ek_key_mismatch", trust, key, cert, [inter.cert])


def test_ek_hash_not_on_the_allowlist_is_refused() -> None:
    key = _ek_key()
    _refused("ek_untrusted", EkTrust([], frozenset({"0" * 64})), key, None, [])


def test_expired_ek_cert_is_refused(root: Ca, inter: Ca) -> None:
    key = _ek_key()
    cert = _ek_cert(inter, key, not_before=NOW - 10 * DAY, not_after=NOW - DAY)
    _refused("ek_untrusted", EkTrust([root.cert], frozenset()), key, cert, [inter.cert])


def test_not_yet_valid_ek_cert_is_refused(root: Ca, inter: Ca) -> None:
    key = _ek_key()
    cert = _ek_cert(inter, key, not_before=NOW + DAY)
    _refused("ek_untrusted", EkTrust([root.cert], frozenset()), key, cert, [inter.cert])


def test_expired_intermediate_is_refused(root: Ca) -> None:
    old = Ca("Expired CA", parent=root, not_before=NOW - 10 * DAY, not_after=NOW - DAY)
    key = _ek_key()
    cert = _ek_cert(old, key)
    _refused("ek_untrusted", EkTrust([root.cert], frozenset()), key, cert, [old.cert])


def test_issuer_that_is_not_a_ca_is_refused(root: Ca) -> None:
    not_ca = Ca("Leaf Posing As CA", parent=root)
    not_ca.cert = _issue(root, not_ca.name, not_ca.key.public_key(), ca=False, manufacturer=None)
    key = _ek_key()
    cert = _ek_cert(not_ca, key)
    _refused("ek_untrusted", EkTrust([root.cert], frozenset()), key, cert, [not_ca.cert])


def test_ca_without_key_cert_sign_is_refused(root: Ca) -> None:
    ku = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=False,
        crl_sign=True, encipher_only=False, decipher_only=False,
    )  # fmt: skip
    weak = Ca("No CertSign CA", parent=root, key_usage=ku)
    key = _ek_key()
    cert = _ek_cert(weak, key)
    _refused("ek_untrusted", EkTrust([root.cert], frozenset()), key, cert, [weak.cert])


def test_missing_intermediate_is_refused(root: Ca, inter: Ca) -> None:
    key = _ek_key()
    _refused("ek_untrusted", EkTrust([root.cert], frozenset()), key, _ek_cert(inter, key), [])


def test_self_signed_ek_cert_is_refused(root: Ca) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    fake = Ca.__new__(Ca)
    fake.key, fake.name = key, _name("self")
    cert = _issue(fake, _name("self"), key.public_key())
    _refused("ek_untrusted", EkTrust([root.cert], frozenset()), key.public_key(), cert, [])


def test_too_many_intermediates_are_refused(root: Ca, inter: Ca) -> None:
    key = _ek_key()
    cert = _ek_cert(inter, key)
    _refused("ek_untrusted", EkTrust([root.cert], frozenset()), key, cert, [inter.cert] * 9)


def test_sha1_signed_ek_cert_is_refused(root: Ca, inter: Ca, tmp_path: Path) -> None:
    # cryptography will not sign with SHA-1; the openssl tool still does.
    pem = serialization.Encoding.PEM
    (tmp_path / "ca.key").write_bytes(
        inter.key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    (tmp_path / "ca.pem").write_bytes(inter.cert.public_bytes(pem))
    ek = rsa.generate_private_key(65537, 2048)
    csr = (
        x509.CertificateSigningRequestBuilder().subject_name(_name("ek")).sign(ek, hashes.SHA256())
    )
    (tmp_path / "ek.csr").write_bytes(csr.public_bytes(pem))
    (tmp_path / "v3.cnf").write_text("basicConstraints = critical, CA:FALSE\n")  # v3, not v1
    subprocess.run(
        ["openssl", "x509", "-req", "-in", "ek.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
         "-sha1", "-days", "2", "-extfile", "v3.cnf", "-out", "ek.pem"],
        cwd=tmp_path, check=True, capture_output=True,
    )  # fmt: skip
    cert = x509.load_pem_x509_certificate((tmp_path / "ek.pem").read_bytes())
    assert cert.signature_hash_algorithm is not None
    assert cert.signature_hash_algorithm.name == "sha1"
    error = _refused(
        "ek_untrusted", EkTrust([root.cert], frozenset()), ek.public_key(), cert, [inter.cert]
    )
    assert "signature algorithm" in str(error).lower(), error


def test_unknown_critical_extension_is_refused(root: Ca, inter: Ca) -> None:
    key = _ek_key()
    unknown = x509.UnrecognizedExtension(x509.ObjectIdentifier("2.23.133.99.1"), b"\x05\x00")
    cert = _ek_cert(inter, key, extra=[(unknown, True)])
    _refused("ek_untrusted", EkTrust([root.cert], frozenset()), key, cert, [inter.cert])
    # The same extension, not critical, is ignored.
    cert = _ek_cert(inter, key, extra=[(unknown, False)])
    assert EkTrust([root.cert], frozenset()).check(key, cert, [inter.cert]).via == "certificate"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x30\x03\x02\x01\x01",  # DER, not a certificate
        b"\xff" * (8 * 1024 + 1),  # too large
    ],
)
def test_load_refuses_garbage(data: bytes) -> None:
    with pytest.raises(AttestationEvidenceError) as info:
        load_ek_certificate(data)
    assert info.value.code == "bad_ek_cert"


def test_load_refuses_ber_and_non_padding_trailers(inter: Ca) -> None:
    der = _ek_cert(inter, _ek_key()).public_bytes(Encoding.DER)
    assert der[1] == 0x82
    ber = b"\x30\x83\x00" + der[2:]  # a non-minimal length: BER, not DER
    for data in (ber, der + b"\x00\x01", der + b"garbage"):
        with pytest.raises(AttestationEvidenceError) as info:
            load_ek_certificate(data)
        assert info.value.code == "bad_ek_cert"


# ---- tolerant -------------------------------------------------------------------


def test_load_accepts_nv_padding(inter: Ca) -> None:
    cert = _ek_cert(inter, _ek_key())
    der = cert.public_bytes(Encoding.DER)
    for pad in (b"", b"\x00" * 100, b"\xff" * 7):
        assert load_ek_certificate(der + pad) == cert


@pytest.mark.parametrize(
    "variant",
    ["critical_san", "non_critical_san", "no_san", "no_eku"],
)
def test_odd_ek_certs_are_accepted(root: Ca, inter: Ca, variant: str) -> None:
    # The EK certificate has an empty subject in every variant (TCG profile: it may).
    key = _ek_key()
    kw: dict[str, Any] = {
        "critical_san": {"san_critical": True},
        "non_critical_san": {"san_critical": False},
        "no_san": {"manufacturer": None},
        "no_eku": {"eku": False},
    }[variant]
    cert = _ek_cert(inter, key, **kw)
    verdict = EkTrust([root.cert], frozenset()).check(key, cert, [inter.cert])
    assert verdict.via == "certificate"
    assert verdict.issuer_cn == "Test TPM Issuing CA"
    assert verdict.manufacturer == (None if variant == "no_san" else "id:49424D00")


def test_intermediate_in_the_bundle_is_enough(inter: Ca) -> None:
    key = _ek_key()
    verdict = EkTrust([inter.cert], frozenset()).check(key, _ek_cert(inter, key), [])
    assert verdict.via == "certificate"


def test_ca_without_key_usage_is_accepted(root: Ca) -> None:
    bare = Ca("Bare CA", parent=root)
    builder = (
        x509.CertificateBuilder()
        .subject_name(bare.name)
        .issuer_name(root.name)
        .public_key(bare.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    )
    bare.cert = builder.sign(root.key, hashes.SHA256())
    key = _ek_key()
    verdict = EkTrust([root.cert], frozenset()).check(key, _ek_cert(bare, key), [bare.cert])
    assert verdict.via == "certificate"


def test_manufacturer_is_normalised_upper_case(inter: Ca) -> None:
    cert = _ek_cert(inter, _ek_key(), manufacturer="id:4e544300")
    assert manufacturer_of(cert) == "id:4E544300"
    assert manufacturer_of(_ek_cert(inter, _ek_key(), manufacturer="Nuvoton")) is None


# ---- allowlist ------------------------------------------------------------------


def test_allowlisted_ek_without_certificate(root: Ca) -> None:
    key = _ek_key()
    verdict = EkTrust([root.cert], frozenset({spki_sha256(key)})).check(key, None, [])
    assert verdict.via == "allowlist" and verdict.issuer_cn is None
    assert verdict.ek_hash == spki_sha256(key)


def test_allowlisted_ek_with_untrusted_certificate(root: Ca) -> None:
    key = _ek_key()
    other = Ca("Unknown Vendor")
    cert = _ek_cert(other, key)
    verdict = EkTrust([root.cert], frozenset({spki_sha256(key)})).check(key, cert, [])
    assert verdict.via == "allowlist"
    assert verdict.issuer_cn is None and verdict.manufacturer is None  # untrusted: not reported


def test_allowlist_entries_must_be_hashes() -> None:
    with pytest.raises(ValueError, match="lower-case hex"):
        EkTrust([], frozenset({"ABC"}))


# ---- swtpm_localca --------------------------------------------------------------


def _pem_certs(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def test_swtpm_ek_certs_chain_to_the_local_ca(swtpm: SwtpmInstance) -> None:
    state = swtpm.state
    root = _pem_certs(state.root_cert)
    issuer = _pem_certs(state.issuer_cert)
    for path in state.ek_certs:
        cert = load_ek_certificate(path.read_bytes())
        key = cert.public_key()
        verdict = EkTrust(root, frozenset()).check(key, cert, issuer)  # type: ignore[arg-type]
        assert verdict.via == "certificate"
        assert verdict.issuer_cn == "swtpm-localca"
        assert verdict.manufacturer == "id:00001014"
        # Without the intermediate it does not chain; with another key it is refused.
        _refused("ek_untrusted", EkTrust(root, frozenset()), key, cert, [])
        _refused("ek_key_mismatch", EkTrust(root, frozenset()), _ek_key(), cert, issuer)


def test_swtpm_ek_cert_from_another_swtpm_ca_is_refused(
    swtpm: SwtpmInstance, swtpm_factory: Any
) -> None:
    other = swtpm_factory(new_identity=True)  # its own swtpm_localca root
    cert = load_ek_certificate(swtpm.state.ek_certs[0].read_bytes())
    trust = EkTrust(_pem_certs(other.state.root_cert), frozenset())
    _refused("ek_untrusted", trust, cert.public_key(), cert, _pem_certs(other.state.issuer_cert))


# ---- hostile certificates (review of issue 10) ------------------------------------


def _swap_oid(cert: x509.Certificate, old: bytes, new: bytes) -> bytes:
    der = cert.public_bytes(Encoding.DER)
    assert der.count(old) == 1
    return der.replace(old, new)


ED25519_OID = bytes.fromhex("06032b6570")  # 1.3.101.112
UNKNOWN_OID = bytes.fromhex("06032b6563")  # 1.3.101.99: no key algorithm at all


def test_ek_cert_with_an_unknown_key_algorithm_is_refused(root: Ca, inter: Ca) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    odd = _ek_cert(inter, ed25519.Ed25519PrivateKey.generate().public_key())
    cert = load_ek_certificate(_swap_oid(odd, ED25519_OID, UNKNOWN_OID))
    trust = EkTrust([root.cert], frozenset())
    error = _refused("ek_key_mismatch", trust, _ek_key(), cert, [])
    assert "cannot be read" in error.message


def test_intermediate_with_an_unknown_key_algorithm_is_refused(root: Ca) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = _ek_key()
    odd = _issue(root, _name("Odd CA"), ed25519.Ed25519PrivateKey.generate().public_key(), ca=True)
    broken = load_ek_certificate(_swap_oid(odd, ED25519_OID, UNKNOWN_OID))
    # An EK certificate whose issuer name is the broken intermediate's subject.
    cert = _issue(Ca("Odd CA"), x509.Name([]), key)
    trust = EkTrust([root.cert], frozenset())
    _refused("ek_untrusted", trust, key, cert, [broken])


@pytest.mark.parametrize("cn", ["CA\nwith a newline", "x" * 2000, "bidi\u202eAC", "\x00"])
def test_an_issuer_cn_that_is_no_selector_value_is_not_reported(root: Ca, cn: str) -> None:
    issuer = Ca(cn, parent=root)
    key = _ek_key()
    verdict = EkTrust([root.cert], frozenset()).check(key, _ek_cert(issuer, key), [issuer.cert])
    assert verdict.via == "certificate" and verdict.issuer_cn is None


@pytest.mark.parametrize(
    "make",
    [
        lambda: rsa.generate_private_key(65537, 1024).public_key(),
        lambda: rsa.generate_private_key(65537, 1536).public_key(),
        lambda: ec.generate_private_key(ec.SECP192R1()).public_key(),
        lambda: ec.generate_private_key(ec.SECP224R1()).public_key(),
        lambda: ec.generate_private_key(ec.SECP256K1()).public_key(),
    ],
    ids=["rsa1024", "rsa1536", "p192", "p224", "secp256k1"],
)
def test_a_weak_ek_is_refused_even_when_certified_or_allowlisted(
    root: Ca, inter: Ca, make: Any
) -> None:
    key = make()
    trust = EkTrust([root.cert], frozenset({spki_sha256(key)}))
    _refused("ek_weak_key", trust, key, _ek_cert(inter, key), [inter.cert])
    _refused("ek_weak_key", trust, key, None, [])


@pytest.mark.parametrize(
    "make",
    [
        lambda: rsa.generate_private_key(65537, 2048).public_key(),
        lambda: rsa.generate_private_key(65537, 3072).public_key(),
        lambda: ec.generate_private_key(ec.SECP256R1()).public_key(),
        lambda: ec.generate_private_key(ec.SECP384R1()).public_key(),
    ],
    ids=["rsa2048", "rsa3072", "p256", "p384"],
)
def test_ek_key_sizes_of_the_tcg_profiles_are_accepted(root: Ca, inter: Ca, make: Any) -> None:
    key = make()
    verdict = EkTrust([root.cert], frozenset()).check(key, _ek_cert(inter, key), [inter.cert])
    assert verdict.via == "certificate"
