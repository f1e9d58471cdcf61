"""Errors of trust bundles."""

from __future__ import annotations

from custos.errors import CustosError


class BundleError(CustosError):
    """A trust bundle (SPIFFE bundle JSON or JWKS) is malformed or unsafe to use."""

    code = "invalid_bundle"
