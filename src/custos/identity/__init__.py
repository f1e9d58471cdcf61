"""Workload identifiers: trust domains, SPIFFE IDs (``spiffe://``) and WIMSE
Workload Identifiers (``wimse://``)."""

from custos.identity.errors import InvalidIdentifierError
from custos.identity.ids import (
    MAX_ID_LENGTH,
    MAX_TRUST_DOMAIN_LENGTH,
    SpiffeId,
    TrustDomain,
    WimseId,
    WorkloadId,
    coerce_spiffe_id,
    coerce_trust_domain,
    coerce_workload_id,
    parse_workload_id,
)
from custos.identity.selector import Selector as Selector

__all__ = [
    "MAX_ID_LENGTH",
    "MAX_TRUST_DOMAIN_LENGTH",
    "InvalidIdentifierError",
    "SpiffeId",
    "TrustDomain",
    "WimseId",
    "WorkloadId",
    "coerce_spiffe_id",
    "coerce_trust_domain",
    "coerce_workload_id",
    "parse_workload_id",
]
