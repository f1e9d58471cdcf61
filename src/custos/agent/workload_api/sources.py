"""What the Workload API serves from: the contract's
:class:`custos.agent.identities.IdentitySource` (identities, bundle, JWT-SVIDs) and,
from the plugin catalog, only ``attest_workload`` (SPIRE's handler declares its
own narrow interfaces)."""

from __future__ import annotations

from typing import Protocol

from custos.agent.identities import IdentitySource, WorkloadIdentity
from custos.identity.selector import Selector
from custos.plugin.protocols import PeerCredentials

#: The custody tier whose private keys are handed to the workload (decision 2).
EXPORTABLE = "exportable"
#: One identity a caller may be entitled to.
ServedIdentity = WorkloadIdentity


class WorkloadAttestation(Protocol):
    """What the API needs from the plugin catalog (``custos.plugin.catalog.AgentCatalog``)."""

    async def attest_workload(self, peer: PeerCredentials) -> tuple[Selector, ...]: ...


__all__ = ["EXPORTABLE", "IdentitySource", "ServedIdentity", "WorkloadAttestation"]
