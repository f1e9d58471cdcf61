"""Typed attestor plugins: protocols, entry-point discovery and the catalog.

- :mod:`custos.plugin.protocols`: what a plugin implements (agent and server
  halves of a node attestor, workload attestor) and the values it exchanges;
- :mod:`custos.plugin.discovery`: the three entry-point groups, listing and
  loading by name (ambiguous names are refused);
- :mod:`custos.plugin.catalog`: loads, configures, checks constraints, wraps
  every call (selector types stamped, agent IDs built, errors named).
"""

from custos.identity.selector import Selector
from custos.plugin.catalog import (
    AGENT_ID_PREFIX,
    AgentCatalog,
    AttestationExchangeError,
    Constraints,
    NodeAttestationResult,
    PluginConfig,
    ServerCatalog,
)
from custos.plugin.discovery import (
    GROUPS,
    KINDS,
    PluginInfo,
    PluginKind,
    discover,
    installed,
    load,
)
from custos.plugin.errors import (
    DuplicatePluginError,
    PluginCallError,
    PluginConfigError,
    PluginError,
    PluginLoadError,
    PluginMisbehavedError,
)
from custos.plugin.protocols import (
    AgentNodeAttestor,
    AttestedNode,
    Challenge,
    CoreConfig,
    InvalidPeerCredentialsError,
    PeerCredentials,
    Plugin,
    ServerNodeAttestor,
    WorkloadAttestor,
)

__all__ = [
    "AGENT_ID_PREFIX",
    "GROUPS",
    "KINDS",
    "AgentCatalog",
    "AgentNodeAttestor",
    "AttestationExchangeError",
    "AttestedNode",
    "Challenge",
    "Constraints",
    "CoreConfig",
    "DuplicatePluginError",
    "InvalidPeerCredentialsError",
    "NodeAttestationResult",
    "PeerCredentials",
    "Plugin",
    "PluginCallError",
    "PluginConfig",
    "PluginConfigError",
    "PluginError",
    "PluginInfo",
    "PluginKind",
    "PluginLoadError",
    "PluginMisbehavedError",
    "Selector",
    "ServerCatalog",
    "ServerNodeAttestor",
    "WorkloadAttestor",
    "discover",
    "installed",
    "load",
]
