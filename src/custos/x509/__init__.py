"""X.509 for a trust domain, one job per module:

- :mod:`custos.x509.ca` issues: root / intermediate CAs, X509-SVIDs from CSRs;
- :mod:`custos.x509.verify` verifies: X509-SVID path validation against bundles;
- :mod:`custos.x509.pem` parses certificates users give (bounded, clear errors).
"""

from custos.x509.ca import (
    BACKDATE,
    MAX_CSR_BYTES,
    CaPrivateKey,
    CertificateAuthority,
    X509Svid,
    load_csr,
    load_csr_file,
)
from custos.x509.errors import (
    CertificateFormatError,
    CsrError,
    X509CaError,
    X509SvidError,
    X509SvidUntrustedError,
)
from custos.x509.pem import load_certificates, load_certificates_file
from custos.x509.verify import MAX_CHAIN_LENGTH, verify_x509_svid

__all__ = [
    "BACKDATE",
    "MAX_CHAIN_LENGTH",
    "MAX_CSR_BYTES",
    "CaPrivateKey",
    "CertificateAuthority",
    "CertificateFormatError",
    "CsrError",
    "X509CaError",
    "X509Svid",
    "X509SvidError",
    "X509SvidUntrustedError",
    "load_certificates",
    "load_certificates_file",
    "load_csr",
    "load_csr_file",
    "verify_x509_svid",
]
