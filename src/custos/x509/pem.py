"""Certificates from users: PEM (one or more blocks) or DER, bounded, clear errors.

A certificate file is named by a user (a CA chain for ``custos server``, an SVID
to check): it is read through :func:`custos._files.read_small_file` (regular
files only, size-capped) and parsed with a cap on the number of certificates,
so a hostile file costs bounded work and ends in :class:`CertificateFormatError`.
"""

from __future__ import annotations

from os import PathLike

from cryptography import x509

from custos._files import read_small_file
from custos.x509.errors import CertificateFormatError

#: A certificate chain or CA bundle file; a certificate is 0.5-2 KiB.
MAX_CERTIFICATE_FILE_BYTES = 256 * 1024
#: Certificates in one file.
MAX_CERTIFICATES = 64
_PEM_CERT = b"-----BEGIN CERTIFICATE-----"


def load_certificates(
    data: bytes, *, what: str = "certificate data"
) -> tuple[x509.Certificate, ...]:
    """Parse PEM (every ``CERTIFICATE`` block, in order) or one DER certificate."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CertificateFormatError(f"{what} must be bytes, not {type(data).__name__}")
    raw = bytes(data)
    if len(raw) > MAX_CERTIFICATE_FILE_BYTES:
        raise CertificateFormatError(f"{what} is larger than {MAX_CERTIFICATE_FILE_BYTES} bytes")
    if not raw.strip():
        raise CertificateFormatError(f"{what} is empty")
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            # Count before parsing: the cap bounds the parser's work too.
            if raw.count(_PEM_CERT) > MAX_CERTIFICATES:
                raise CertificateFormatError(
                    f"{what} holds more than {MAX_CERTIFICATES} certificates"
                )
            certs = tuple(x509.load_pem_x509_certificates(raw))
        else:
            certs = (x509.load_der_x509_certificate(raw),)
    except ValueError as e:
        raise CertificateFormatError(f"{what} is not a PEM or DER certificate: {e}") from e
    return certs


def load_certificates_file(
    path: str | PathLike[str], *, what: str = "certificate file"
) -> tuple[x509.Certificate, ...]:
    """Read and parse a certificate file named by a user (see :func:`load_certificates`)."""
    data = read_small_file(path, max_bytes=MAX_CERTIFICATE_FILE_BYTES, what=what)
    return load_certificates(data, what=f"{what} {str(path)!r}")


__all__ = [
    "MAX_CERTIFICATES",
    "MAX_CERTIFICATE_FILE_BYTES",
    "load_certificates",
    "load_certificates_file",
]
