"""Attestor plugin discovery through entry points.

Groups:

- ``custos.node_attestors``: node attestor pairs (agent side makes evidence,
  server side verifies it and yields selectors).
- ``custos.workload_attestors``: agent-side workload attestors (caller ->
  selectors).

Built-ins in ``attestors/custos_attestors`` register through the same groups.
A plugin's load failure is never swallowed: it is raised as a
:class:`PluginLoadError` naming the plugin.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Literal

from custos.errors import CustosError

PluginKind = Literal["node", "workload"]
GROUPS: dict[PluginKind, str] = {
    "node": "custos.node_attestors",
    "workload": "custos.workload_attestors",
}


class PluginLoadError(CustosError):
    code = "plugin_load_failed"


class DuplicatePluginError(PluginLoadError):
    code = "plugin_duplicate"


@dataclass(frozen=True)
class PluginInfo:
    name: str
    kind: PluginKind
    value: str  # "module:attr"
    distribution: str | None


def _entry_points(kind: PluginKind) -> list[EntryPoint]:
    return list(entry_points(group=GROUPS[kind]))


def discover(kind: PluginKind) -> list[PluginInfo]:
    """Every plugin of ``kind`` installed, without importing any of them.

    Two distributions registering the same name is an error: SPIRE's catalog
    refuses ambiguity, and so do we.
    """
    seen: dict[str, PluginInfo] = {}
    for ep in _entry_points(kind):
        dist = ep.dist.name if ep.dist is not None else None
        info = PluginInfo(ep.name, kind, ep.value, dist)
        if ep.name in seen and seen[ep.name].value != ep.value:
            raise DuplicatePluginError(
                f"{kind} attestor {ep.name!r} is registered twice: by "
                f"{seen[ep.name].distribution} ({seen[ep.name].value}) and by {dist} ({ep.value})"
            )
        seen[ep.name] = info
    return sorted(seen.values(), key=lambda p: p.name)


def load(kind: PluginKind, name: str) -> object:
    """Import and return the object a plugin's entry point names."""
    for ep in _entry_points(kind):
        if ep.name == name:
            try:
                return ep.load()
            except Exception as e:
                raise PluginLoadError(
                    f"{kind} attestor {name!r} ({ep.value}) failed to load: {e}"
                ) from e
    known = ", ".join(p.name for p in discover(kind)) or "none"
    raise PluginLoadError(f"no {kind} attestor named {name!r} is installed (installed: {known})")
