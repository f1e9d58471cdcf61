"""X.509 CA for a trust domain: root / intermediate CAs, X509-SVID issuance and verification."""

from custos.x509.ca import (
    BACKDATE,
    CaPrivateKey,
    CertificateAuthority,
    X509Svid,
    load_csr,
    verify_x509_svid,
)
from custos.x509.errors import CsrError, X509CaError, X509SvidError, X509SvidUntrustedError

__all__ = [
    "BACKDATE",
    "CaPrivateKey",
    "CertificateAuthority",
    "CsrError",
    "X509CaError",
    "X509Svid",
    "X509SvidError",
    "X509SvidUntrustedError",
    "load_csr",
    "verify_x509_svid",
]
