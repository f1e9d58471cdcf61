"""Errors of the X.509 CA and of X509-SVID verification."""

from __future__ import annotations

from custos.errors import CustosError


class X509CaError(CustosError):
    """The CA cannot issue what was asked (wrong trust domain, expired CA, bad arguments)."""

    code = "x509_ca_error"


class CsrError(X509CaError):
    """A certificate signing request is malformed, not self-signed correctly, or
    holds a key type the CA does not certify."""

    code = "invalid_csr"


class X509SvidError(CustosError):
    """An X509-SVID breaks a rule of the X509-SVID spec (leaf checks)."""

    code = "invalid_x509_svid"


class X509SvidUntrustedError(X509SvidError):
    """An X509-SVID does not chain to a trusted authority of its trust domain."""

    code = "x509_svid_untrusted"


class CertificateFormatError(CustosError):
    """Certificate data (a file or bytes from a user) is not PEM or DER certificates,
    or is larger than allowed."""

    code = "invalid_certificate"
