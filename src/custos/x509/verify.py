"""Verification: X509-SVID path validation (SPIFFE X509-SVID spec, section 5).

Issuance lives in :mod:`custos.x509.ca`; this module only decides whether a
chain someone presents is an SVID of a trusted authority, and whose.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from cryptography import x509
from cryptography.x509.verification import (
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from custos.bundle.bundle import BundleSet
from custos.identity.errors import InvalidIdentifierError
from custos.identity.ids import SpiffeId
from custos.x509._time import utcnow
from custos.x509.errors import X509SvidError, X509SvidUntrustedError

#: Certificates in a presented chain (leaf + intermediates); real ones have 1-4.
MAX_CHAIN_LENGTH = 16


def _leaf_spiffe_id(leaf: x509.Certificate) -> SpiffeId:
    """Apply the X509-SVID spec's leaf rules (section 5.2) and return the SPIFFE ID."""
    try:
        extensions = leaf.extensions
    except ValueError as e:  # duplicate or malformed extensions
        raise X509SvidError(f"certificate extensions are malformed: {e}") from e
    try:
        san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise X509SvidError("leaf certificate has no subjectAltName (no SPIFFE ID)") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise X509SvidError(f"leaf certificate must have exactly one URI SAN, found {len(uris)}")
    try:
        spiffe_id = SpiffeId.parse(uris[0])
    except InvalidIdentifierError as e:
        raise X509SvidError(f"leaf URI SAN is not a valid SPIFFE ID: {e.message}") from e
    if not spiffe_id.path:
        raise X509SvidError("leaf SPIFFE ID has no path (a trust domain ID cannot be a leaf)")
    try:
        bc = extensions.get_extension_for_class(x509.BasicConstraints).value
        if bc.ca:
            raise X509SvidError("leaf certificate is a CA (basicConstraints cA is TRUE)")
    except x509.ExtensionNotFound:
        pass
    try:
        ku = extensions.get_extension_for_class(x509.KeyUsage).value
        if ku.key_cert_sign:
            raise X509SvidError("leaf certificate has keyCertSign set")
        if ku.crl_sign:
            raise X509SvidError("leaf certificate has cRLSign set")
    except x509.ExtensionNotFound:
        pass
    return spiffe_id


def verify_x509_svid(
    chain: Sequence[x509.Certificate],
    bundles: BundleSet,
    now: datetime | None = None,
) -> SpiffeId:
    """Verify an X509-SVID chain (leaf first) and return its SPIFFE ID.

    Path validation (RFC 5280, cryptography's verifier) runs against the X.509
    authorities of the leaf's own trust domain only, so a CA of one federated
    domain cannot vouch for IDs of another.  EKU is not enforced (as
    go-spiffe does): SVIDs are used as both TLS client and server certificates.
    """
    if isinstance(chain, (str, bytes)) or not isinstance(chain, Sequence):
        raise X509SvidError(f"chain must be a sequence of certificates, not {type(chain).__name__}")
    if not chain:
        raise X509SvidError("empty certificate chain")
    if len(chain) > MAX_CHAIN_LENGTH:
        # Path building is work done before anything is trusted: bound it.
        raise X509SvidError(f"chain has {len(chain)} certificates; at most {MAX_CHAIN_LENGTH}")
    for cert in chain:
        if not isinstance(cert, x509.Certificate):
            raise X509SvidError(f"chain holds a {type(cert).__name__}, not a certificate")
    leaf = chain[0]
    spiffe_id = _leaf_spiffe_id(leaf)
    bundle = bundles.get(spiffe_id.trust_domain)
    if bundle is None or not bundle.x509_authorities:
        raise X509SvidUntrustedError(
            f"no X.509 authorities for trust domain {spiffe_id.trust_domain.name!r}"
        )
    current = utcnow(now, X509SvidError)
    verifier = (
        PolicyBuilder()
        .store(Store(list(bundle.x509_authorities)))
        .time(current)
        .extension_policies(
            ca_policy=ExtensionPolicy.webpki_defaults_ca(),
            ee_policy=ExtensionPolicy.permit_all(),
        )
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, list(chain[1:]))
    except VerificationError as e:
        raise X509SvidUntrustedError(f"certificate chain does not verify: {e}") from e
    return spiffe_id


__all__ = ["MAX_CHAIN_LENGTH", "verify_x509_svid"]
