"""Attestor plugin discovery through entry points.

Three groups, one per half, so a process imports only the halves it runs (a
server never imports an agent half's device code; decision 0023):

- ``custos.agent.node_attestors``: the agent half of a node attestor (makes evidence);
- ``custos.server.node_attestors``: the server half (verifies it, yields selectors);
- ``custos.workload_attestors``: agent-side workload attestors (caller -> selectors).

Built-ins in ``attestors/custos_attestors`` register through the same groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Literal, get_args

from custos.plugin.errors import DuplicatePluginError, PluginLoadError

PluginKind = Literal["agent_node_attestor", "server_node_attestor", "workload_attestor"]
KINDS: tuple[PluginKind, ...] = get_args(PluginKind)
GROUPS: dict[PluginKind, str] = {
    "agent_node_attestor": "custos.agent.node_attestors",
    "server_node_attestor": "custos.server.node_attestors",
    "workload_attestor": "custos.workload_attestors",
}


def kind_label(kind: PluginKind) -> str:
    """``agent node attestor`` etc., for messages."""
    return kind.replace("_", " ")


@dataclass(frozen=True)
class PluginInfo:
    """An installed plugin, as ``custos plugins list`` shows it."""

    name: str
    kind: PluginKind
    value: str  # "module:attr"
    distribution: str | None


def _info(kind: PluginKind, ep: EntryPoint) -> PluginInfo:
    return PluginInfo(ep.name, kind, ep.value, ep.dist.name if ep.dist is not None else None)


def _unique(kind: PluginKind, name: str | None = None) -> dict[str, tuple[EntryPoint, PluginInfo]]:
    """Entry points of ``kind`` (only ``name`` if given) by name; a name registered
    twice with different targets is an error, never "first" or "last one wins"."""
    seen: dict[str, tuple[EntryPoint, PluginInfo]] = {}
    for ep in entry_points(group=GROUPS[kind]):
        if name is not None and ep.name != name:
            continue
        info = _info(kind, ep)
        if ep.name in seen and seen[ep.name][1].value != ep.value:
            first = seen[ep.name][1]
            raise DuplicatePluginError(
                f"{kind_label(kind)} {ep.name!r} is registered twice: by "
                f"{first.distribution} ({first.value}) and by {info.distribution} ({ep.value})"
            )
        seen.setdefault(ep.name, (ep, info))
    return seen


def discover(kind: PluginKind) -> list[PluginInfo]:
    """Every plugin of ``kind`` installed, sorted by name, without importing any."""
    return sorted((info for _, info in _unique(kind).values()), key=lambda p: p.name)


def installed() -> list[PluginInfo]:
    """Every installed plugin of every kind (what ``custos plugins list`` prints)."""
    return [info for kind in KINDS for info in discover(kind)]


def find(kind: PluginKind, name: str) -> tuple[EntryPoint, PluginInfo]:
    """The one entry point of ``kind`` named ``name`` (not imported)."""
    found = _unique(kind, name)
    if name not in found:
        known = ", ".join(p.name for p in discover(kind)) or "none"
        raise PluginLoadError(
            f"no {kind_label(kind)} named {name!r} is installed (installed: {known})"
        )
    return found[name]


def load_plugin(kind: PluginKind, name: str) -> tuple[PluginInfo, object]:
    """Import the plugin's entry point; return its info and the object it names."""
    ep, info = find(kind, name)
    try:
        return info, ep.load()
    except Exception as e:
        raise PluginLoadError(
            f"{kind_label(kind)} {name!r} ({info.value}) failed to load: {e}"
        ) from e


def load(kind: PluginKind, name: str) -> object:
    """Import and return the object the plugin's entry point names (its factory)."""
    return load_plugin(kind, name)[1]
