"""The ``unix`` workload attestor: the caller's uid, gid, groups and (optionally) its
executable's path and SHA-256, from the kernel's peer credentials and ``/proc``.

Registered in the ``custos.workload_attestors`` entry-point group as ``unix``, so its
selectors read ``unix:uid:1000``, ``unix:sha256:<hex>`` (the catalog adds the type).
"""

from custos_attestors.workload.unix.attestor import (
    DEFAULT_HASH_CACHE_ENTRIES,
    DEFAULT_MAX_BINARY_BYTES,
    UnixAttestorConfigError,
    UnixWorkloadAttestor,
)
from custos_attestors.workload.unix.proc import (
    CallerCredentialsChangedError,
    CallerGoneError,
    ExecutableHashCache,
    ProcReadError,
)

__all__ = [
    "DEFAULT_HASH_CACHE_ENTRIES",
    "DEFAULT_MAX_BINARY_BYTES",
    "CallerCredentialsChangedError",
    "CallerGoneError",
    "ExecutableHashCache",
    "ProcReadError",
    "UnixAttestorConfigError",
    "UnixWorkloadAttestor",
]
