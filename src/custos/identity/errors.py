"""Errors of workload identifiers (SPIFFE IDs, WIMSE identifiers, trust domains)."""

from __future__ import annotations

from custos.errors import CustosError


class InvalidIdentifierError(CustosError):
    """A trust domain name, SPIFFE ID or WIMSE identifier breaks its syntax rules.

    The message names the rule that was broken; it echoes at most a short,
    ``repr``-escaped prefix of the input so logs stay readable and safe.
    """

    code = "invalid_identifier"
