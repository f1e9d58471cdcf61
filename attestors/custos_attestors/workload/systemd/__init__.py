"""The ``systemd`` workload attestor: the caller's systemd unit, from its cgroup.

Registered in ``custos.workload_attestors`` as ``systemd``: selectors
``systemd:id:<unit>`` and ``systemd:fragment_path:<unit file>``.
"""

from custos_attestors.workload.systemd.attestor import (
    DEFAULT_UNIT_DIRECTORIES,
    SystemdAttestorConfigError,
    SystemdWorkloadAttestor,
    fragment_path,
)

__all__ = [
    "DEFAULT_UNIT_DIRECTORIES",
    "SystemdAttestorConfigError",
    "SystemdWorkloadAttestor",
    "fragment_path",
]
