"""The ``unix`` workload attestor (SPIRE's ``unix`` WorkloadAttestor, with a pidfd).

Selector values (the catalog stamps the type ``unix``):

- ``uid:<n>``, ``gid:<n>``: the kernel's peer credentials (``SO_PEERCRED``, taken
  when the caller connected); ``/proc`` must still show the same effective ids;
- ``user:<name>``, ``group:<name>``: their names, when the system has them (a uid
  without a passwd entry simply has no ``user`` selector);
- ``supplementary_gid:<n>`` and ``supplementary_group:<name>``: each supplementary
  group of the caller (``/proc/<pid>/status`` ``Groups``);
- with ``discover_workload_path = true``: ``path:<executable>`` and
  ``sha256:<hex>`` of the executable the process runs (no ``sha256`` when it is
  larger than ``max_binary_bytes``).

Settings: ``discover_workload_path`` (bool, default false), ``max_binary_bytes``
(int, default 256 MiB), ``hash_cache_entries`` (int, default 1024).
"""

from __future__ import annotations

import grp
import pwd
from collections.abc import Mapping, Sequence

from custos.errors import CustosError
from custos.identity.errors import InvalidIdentifierError
from custos.identity.selector import check_selector_value
from custos.plugin.catalog import MAX_SELECTORS_PER_CALL
from custos.plugin.protocols import CoreConfig, PeerCredentials
from custos_attestors.workload.unix.proc import (
    CallerCredentialsChangedError,
    CallerGoneError,
    ExecutableHashCache,
    ProcReadError,
    UnixAttestationError,
    ensure_alive,
    executable_path,
    read_status,
)

DEFAULT_MAX_BINARY_BYTES = 256 * 1024 * 1024
#: No binary custos would hash is larger; a bigger number is a typo.
MAX_MAX_BINARY_BYTES = 16 * 1024 * 1024 * 1024
DEFAULT_HASH_CACHE_ENTRIES = 1024
MAX_HASH_CACHE_ENTRIES = 1 << 20


class UnixAttestorConfigError(CustosError):
    """A setting of the ``unix`` workload attestor is unknown or invalid."""

    code = "unix_attestor_config"


def _bool(config: Mapping[str, object], key: str, default: bool) -> bool:
    value = config.get(key, default)
    if not isinstance(value, bool):
        raise UnixAttestorConfigError(f"{key} must be true or false")
    return value


def _int(config: Mapping[str, object], key: str, default: int, high: int) -> int:
    value = config.get(key, default)
    # bool is an int: `max_binary_bytes = true` is a mistake, not 1 byte.
    if not isinstance(value, int) or isinstance(value, bool):
        raise UnixAttestorConfigError(f"{key} must be an integer")
    if not 1 <= value <= high:
        raise UnixAttestorConfigError(f"{key} must be from 1 to {high}")
    return value


def _user(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _group(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None


class UnixWorkloadAttestor:
    """Entry point ``unix`` in ``custos.workload_attestors``."""

    SETTINGS = frozenset({"discover_workload_path", "max_binary_bytes", "hash_cache_entries"})

    def __init__(self) -> None:
        self._discover_path = False
        self._hashes: ExecutableHashCache | None = None

    @property
    def hash_cache(self) -> ExecutableHashCache | None:
        """The executable hash cache (``None`` unless ``discover_workload_path``)."""
        return self._hashes

    def configure(self, config: Mapping[str, object], core: CoreConfig) -> None:
        unknown = sorted(str(k) for k in config if k not in self.SETTINGS)
        if unknown:
            raise UnixAttestorConfigError(
                f"unknown unix attestor setting(s): {', '.join(unknown)} "
                f"(known: {', '.join(sorted(self.SETTINGS))})"
            )
        self._discover_path = _bool(config, "discover_workload_path", False)
        max_bytes = _int(config, "max_binary_bytes", DEFAULT_MAX_BINARY_BYTES, MAX_MAX_BINARY_BYTES)
        entries = _int(
            config, "hash_cache_entries", DEFAULT_HASH_CACHE_ENTRIES, MAX_HASH_CACHE_ENTRIES
        )
        self._hashes = (
            ExecutableHashCache(max_entries=entries, max_bytes=max_bytes)
            if self._discover_path
            else None
        )

    async def attest(self, peer: PeerCredentials) -> Sequence[str]:
        status = read_status(peer.pid)
        if status.exited:
            raise CallerGoneError(f"process {peer.pid} has exited")
        if status.uids[1] != peer.uid or status.gids[1] != peer.gid:
            raise CallerCredentialsChangedError(
                f"process {peer.pid} connected as uid {peer.uid} gid {peer.gid} but now runs "
                f"as uid {status.uids[1]} gid {status.gids[1]}"
            )
        values = [f"uid:{peer.uid}", f"gid:{peer.gid}"]
        user = _user(peer.uid)
        if user is not None:
            values.append(f"user:{user}")
        group = _group(peer.gid)
        if group is not None:
            values.append(f"group:{group}")
        for gid in sorted(set(status.groups)):
            values.append(f"supplementary_gid:{gid}")
            name = _group(gid)
            if name is not None:
                values.append(f"supplementary_group:{name}")
        if self._hashes is not None:
            path = executable_path(peer.pid)
            values.append(_path_selector(path, peer.pid))
            digest = await self._hashes.sha256(peer.pid)
            if executable_path(peer.pid) != path:
                # An exec between the two reads: the path and the hash could name
                # different programs.
                raise ProcReadError(f"process {peer.pid} ran another program during attestation")
            if digest is not None:
                values.append(f"sha256:{digest}")
        if len(values) > MAX_SELECTORS_PER_CALL:
            raise UnixAttestationError(
                f"process {peer.pid} has {len(status.groups)} supplementary groups: more "
                f"selectors than the {MAX_SELECTORS_PER_CALL} one attestation may carry"
            )
        # Last: every fact above came through /proc/<pid>; it was this caller's only
        # if the caller is still alive now (a live process keeps its PID).
        ensure_alive(peer.pidfd, peer.pid)
        return values

    def close(self) -> None:
        self._hashes = None


def _path_selector(path: str, pid: int) -> str:
    try:
        return check_selector_value(f"path:{path}")
    except InvalidIdentifierError as e:
        # A path with control characters or of over 1 KiB cannot be compared safely.
        raise ProcReadError(
            f"the executable path of process {pid} cannot be a selector: {e.message}"
        ) from None


__all__ = [
    "DEFAULT_HASH_CACHE_ENTRIES",
    "DEFAULT_MAX_BINARY_BYTES",
    "UnixAttestorConfigError",
    "UnixWorkloadAttestor",
]
