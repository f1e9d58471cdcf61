"""Hostile inputs to custos.x509: CSR and certificate files named by users, and
chains presented for verification, end in a clear custos error (never a hang, a
MemoryError or a traceback from another library)."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from custos._files import UnreadableFileError
from custos.bundle import BundleSet, TrustBundle
from custos.identity import SpiffeId, TrustDomain
from custos.x509 import (
    MAX_CHAIN_LENGTH,
    MAX_CSR_BYTES,
    CertificateAuthority,
    CertificateFormatError,
    CsrError,
    X509SvidError,
    load_certificates,
    load_certificates_file,
    load_csr_file,
    verify_x509_svid,
)
from custos.x509.pem import MAX_CERTIFICATE_FILE_BYTES, MAX_CERTIFICATES

TD = TrustDomain("example.org")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.self_signed(
        ec.generate_private_key(ec.SECP256R1()), TD, ttl=timedelta(days=1)
    )


def csr_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "w")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return csr.public_bytes(Encoding.PEM)


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


# -- CSR files ---------------------------------------------------------------------


def test_csr_file_round_trip(tmp_path: Path, ca: CertificateAuthority) -> None:
    path = tmp_path / "w.csr"
    path.write_bytes(csr_pem())
    csr = load_csr_file(path)
    svid = ca.sign_x509_svid(
        csr.public_bytes(Encoding.DER), SpiffeId.parse("spiffe://example.org/w"), timedelta(hours=1)
    )
    assert svid.spiffe_id.path == "/w"


@pytest.mark.parametrize("special", ["fifo", "/dev/zero", "dir"])
def test_csr_file_that_is_not_a_regular_file(tmp_path: Path, fifo: Path, special: str) -> None:
    path = {"fifo": fifo, "dir": tmp_path}.get(special, Path(special))
    with pytest.raises(UnreadableFileError) as exc:
        load_csr_file(path)
    assert exc.value.reason == "not_regular"


def test_csr_file_too_large_or_garbage(tmp_path: Path) -> None:
    big = tmp_path / "big.csr"
    big.write_bytes(b"A" * (MAX_CSR_BYTES + 1))
    with pytest.raises(UnreadableFileError) as exc:
        load_csr_file(big)
    assert exc.value.reason == "too_large"
    junk = tmp_path / "junk.csr"
    junk.write_bytes(
        b"-----BEGIN CERTIFICATE REQUEST-----\n!!\n-----END CERTIFICATE REQUEST-----\n"
    )
    with pytest.raises(CsrError, match="malformed CSR"):
        load_csr_file(junk)
    with pytest.raises(UnreadableFileError, match="does not exist"):
        load_csr_file(tmp_path / "missing.csr")


# -- certificate files ----------------------------------------------------------------


def test_certificates_pem_chain_and_der(tmp_path: Path, ca: CertificateAuthority) -> None:
    pem = ca.certificate.public_bytes(Encoding.PEM)
    path = tmp_path / "chain.pem"
    path.write_bytes(pem + b"\n" + pem)
    assert load_certificates_file(path) == (ca.certificate, ca.certificate)
    assert load_certificates(ca.certificate.public_bytes(Encoding.DER)) == (ca.certificate,)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"   \n", "empty"),
        (b"not a certificate", "not a PEM or DER certificate"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "not a PEM or DER"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "not a PEM or DER"),
        (b"0" * (MAX_CERTIFICATE_FILE_BYTES + 1), "larger than"),
        ("text, not bytes", "must be bytes"),
    ],
)
def test_bad_certificate_data(data: bytes, message: str) -> None:
    with pytest.raises(CertificateFormatError, match=message) as exc:
        load_certificates(data)
    assert exc.value.code == "invalid_certificate"


def test_too_many_certificates(ca: CertificateAuthority) -> None:
    pem = ca.certificate.public_bytes(Encoding.PEM)
    assert len(load_certificates(pem * MAX_CERTIFICATES)) == MAX_CERTIFICATES
    with pytest.raises(CertificateFormatError, match=f"more than {MAX_CERTIFICATES}"):
        load_certificates(pem * (MAX_CERTIFICATES + 1))


def test_certificate_file_that_is_a_fifo(fifo: Path) -> None:
    with pytest.raises(UnreadableFileError, match="certificate file"):
        load_certificates_file(fifo)


# -- chains presented for verification ------------------------------------------------


def test_verify_refuses_what_is_not_a_certificate_chain(ca: CertificateAuthority) -> None:
    bundles = BundleSet([TrustBundle(TD, (ca.certificate,))])
    for chain in ([b"DER bytes"], b"DER bytes", ["pem"], [ca.certificate, None]):
        with pytest.raises(X509SvidError):
            verify_x509_svid(chain, bundles)  # type: ignore[arg-type]


def test_verify_bounds_the_chain_length(ca: CertificateAuthority) -> None:
    bundles = BundleSet([TrustBundle(TD, (ca.certificate,))])
    svid = ca.sign_x509_svid(
        csr_pem(), SpiffeId.parse("spiffe://example.org/w"), timedelta(hours=1)
    )
    chain = [svid.leaf] + [ca.certificate] * MAX_CHAIN_LENGTH
    with pytest.raises(X509SvidError, match=f"at most {MAX_CHAIN_LENGTH}"):
        verify_x509_svid(chain, bundles)


def test_verify_refuses_a_now_that_is_not_an_aware_datetime(ca: CertificateAuthority) -> None:
    bundles = BundleSet([TrustBundle(TD, (ca.certificate,))])
    svid = ca.sign_x509_svid(
        csr_pem(), SpiffeId.parse("spiffe://example.org/w"), timedelta(hours=1)
    )
    with pytest.raises(X509SvidError, match="must be a datetime"):
        verify_x509_svid(svid.cert_chain, bundles, now=1.5)  # type: ignore[arg-type]
