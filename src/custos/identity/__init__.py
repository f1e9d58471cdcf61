"""Workload identifiers: trust domains, SPIFFE IDs (``spiffe://``) and WIMSE
Workload Identifiers (``wimse://``)."""

from custos.identity import ids
from custos.identity.errors import InvalidIdentifierError
from custos.identity.ids import *  # noqa: F403 -- the package exports exactly ids.__all__ (+ below)
from custos.identity.selector import Selector as Selector

__all__ = ["InvalidIdentifierError"]
__all__ += ids.__all__
