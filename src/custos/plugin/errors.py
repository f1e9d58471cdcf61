"""Errors of attestor plugin discovery, loading and calls.

A plugin's own exception is never swallowed: it is chained (``raise ... from``)
under a :class:`PluginCallError` whose message and attributes name the plugin.
"""

from __future__ import annotations

from custos.errors import CustosError


class PluginError(CustosError):
    """Root of the plugin errors."""

    code = "plugin_error"


class PluginLoadError(PluginError):
    """A plugin is not installed, fails to import, or does not implement its protocol."""

    code = "plugin_load_failed"


class DuplicatePluginError(PluginLoadError):
    """Two entry points of one group share a name: custos refuses to pick one."""

    code = "plugin_duplicate"


class PluginConfigError(PluginError):
    """The plugin configuration breaks a catalog rule (counts, duplicates, names)."""

    code = "plugin_config"


class PluginCallError(PluginError):
    """A plugin raised; the plugin's exception is the ``__cause__``."""

    code = "plugin_failed"

    def __init__(self, message: str, *, plugin: str, kind: str) -> None:
        super().__init__(message)
        #: the plugin's configured name and its kind (see :data:`PluginKind`)
        self.plugin = plugin
        self.kind = kind


class PluginMisbehavedError(PluginCallError):
    """A plugin broke its contract: wrong result types, a selector type of its own
    choosing, an invalid agent path segment, an oversized message."""

    code = "plugin_misbehaved"
