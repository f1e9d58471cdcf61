"""Trust bundles (SPIFFE bundle format) and bundle sets for federation."""

from custos.bundle.bundle import (
    USE_JWT_SVID,
    USE_WIT_SVID,
    USE_X509_SVID,
    BundleSet,
    JwtAuthority,
    JwtPublicKey,
    TrustBundle,
)
from custos.bundle.errors import BundleError

__all__ = [
    "USE_JWT_SVID",
    "USE_WIT_SVID",
    "USE_X509_SVID",
    "BundleError",
    "BundleSet",
    "JwtAuthority",
    "JwtPublicKey",
    "TrustBundle",
]
