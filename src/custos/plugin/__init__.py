"""Typed attestor plugins: protocols, entry-point discovery and the catalog.

- :mod:`custos.plugin.protocols`: what a plugin implements (agent and server
  halves of a node attestor, workload attestor) and the values it exchanges;
- :mod:`custos.plugin.discovery`: the three entry-point groups, listing and
  loading by name (ambiguous names are refused);
- :mod:`custos.plugin.catalog`: loads, configures, checks constraints, wraps
  every call (selector types stamped, agent IDs built, errors named).
"""

from custos.identity.selector import Selector
from custos.plugin import protocols
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
from custos.plugin.protocols import *  # noqa: F403 -- exactly protocols.__all__, listed once there

__all__ = [
    "AGENT_ID_PREFIX",
    "GROUPS",
    "KINDS",
    "AgentCatalog",
    "AttestationExchangeError",
    "Constraints",
    "DuplicatePluginError",
    "NodeAttestationResult",
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
    "discover",
    "installed",
    "load",
]
__all__ += protocols.__all__
