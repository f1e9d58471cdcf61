"""The ``systemd`` workload attestor (SPIRE's ``systemd`` WorkloadAttestor, from the
cgroup file instead of D-Bus; decision 0096).

Selector values (the catalog stamps the type ``systemd``):

- ``id:<unit>``: the unit whose cgroup holds the caller (``nginx.service``,
  ``session-3.scope``, ``user@1000.service`` for anything a user manager runs), read
  from ``/proc/<pid>/cgroup`` (the ``name=systemd`` line, else the ``0::`` line) and
  trusted only once the caller's pidfd is shown still alive;
- ``fragment_path:<path>``: the unit file, when one is found in the unit directories
  (first match in order, the template ``foo@.service`` for an instance
  ``foo@bar.service``; a masked unit, linked to ``/dev/null``, has none).

No unit (a process outside any systemd unit's cgroup) gives no selectors.

Setting: ``unit_directories`` (list of absolute paths; default systemd's system unit
search path, :data:`DEFAULT_UNIT_DIRECTORIES`).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping, Sequence

from custos.errors import CustosError
from custos.identity.errors import InvalidIdentifierError
from custos.identity.selector import check_selector_value
from custos.plugin.protocols import CoreConfig, PeerCredentials
from custos_attestors.workload.cgroups import read_cgroup, systemd_unit

#: systemd's system unit search path (systemd.unit(5), "System Unit Search Path"),
#: highest priority first; /lib/systemd/system for Debian systems without merged /usr.
DEFAULT_UNIT_DIRECTORIES: tuple[str, ...] = (
    "/etc/systemd/system.control",
    "/run/systemd/system.control",
    "/run/systemd/transient",
    "/run/systemd/generator.early",
    "/etc/systemd/system",
    "/etc/systemd/system.attached",
    "/run/systemd/system",
    "/run/systemd/system.attached",
    "/run/systemd/generator",
    "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
    "/run/systemd/generator.late",
)
MAX_UNIT_DIRECTORIES = 64


class SystemdAttestorConfigError(CustosError):
    """A setting of the ``systemd`` workload attestor is unknown or invalid."""

    code = "systemd_attestor_config"


def _template(unit: str) -> str | None:
    """``foo@.service`` for ``foo@bar.service``; ``None`` for a unit without instance."""
    prefix, at, rest = unit.partition("@")
    if not at or not rest:
        return None
    _, dot, suffix = rest.rpartition(".")
    if not dot or not suffix:
        return None
    return f"{prefix}@.{suffix}"


def _regular_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)  # follows links: /dev/null is not
    except OSError:
        return False


def fragment_path(unit: str, directories: Sequence[str]) -> str | None:
    """The first ``<dir>/<unit>`` (then ``<dir>/<template>``) that is a regular file."""
    names = [unit]
    template = _template(unit)
    if template is not None:
        names.append(template)
    for name in names:
        for directory in directories:
            path = os.path.join(directory, name)
            if _regular_file(path):
                return path
    return None


class SystemdWorkloadAttestor:
    """Entry point ``systemd`` in ``custos.workload_attestors``."""

    SETTINGS = frozenset({"unit_directories"})

    def __init__(self) -> None:
        self._directories: tuple[str, ...] = DEFAULT_UNIT_DIRECTORIES
        self._proc = "/proc"

    def configure(self, config: Mapping[str, object], core: CoreConfig) -> None:
        unknown = sorted(str(k) for k in config if k not in self.SETTINGS)
        if unknown:
            raise SystemdAttestorConfigError(
                f"unknown systemd attestor setting(s): {', '.join(unknown)} "
                f"(known: {', '.join(sorted(self.SETTINGS))})"
            )
        dirs = config.get("unit_directories", list(DEFAULT_UNIT_DIRECTORIES))
        if not isinstance(dirs, (list, tuple)) or not all(isinstance(d, str) for d in dirs):
            raise SystemdAttestorConfigError("unit_directories must be a list of paths")
        if len(dirs) > MAX_UNIT_DIRECTORIES:
            raise SystemdAttestorConfigError(
                f"unit_directories lists more than {MAX_UNIT_DIRECTORIES} directories"
            )
        for d in dirs:
            if not os.path.isabs(d) or "\x00" in d:
                raise SystemdAttestorConfigError(f"unit_directories: {d!r} is not an absolute path")
        self._directories = tuple(os.path.normpath(d) for d in dirs)

    @property
    def unit_directories(self) -> tuple[str, ...]:
        return self._directories

    async def attest(self, peer: PeerCredentials) -> Sequence[str]:
        # read_cgroup checks the pidfd after the read: the text is the caller's.
        unit = systemd_unit(read_cgroup(peer, proc=self._proc))
        if unit is None:
            return []
        values = [f"id:{unit}"]
        path = fragment_path(unit, self._directories)
        if path is not None:
            try:
                values.append(check_selector_value(f"fragment_path:{path}"))
            except InvalidIdentifierError:
                pass  # a path that cannot be a selector (over 1 KiB): no fragment_path
        return values

    def close(self) -> None:
        pass  # nothing held


__all__ = [
    "DEFAULT_UNIT_DIRECTORIES",
    "SystemdAttestorConfigError",
    "SystemdWorkloadAttestor",
    "fragment_path",
]
