"""The ``docker`` workload attestor: the caller's container (from ``/proc/<pid>/cgroup``)
described by the Docker Engine API on its Unix socket.

Registered in the ``custos.workload_attestors`` entry-point group as ``docker``, so its
selectors read ``docker:label:<key>:<value>``, ``docker:image_id:<image>`` and
``docker:env:<NAME>=<value>`` (the catalog adds the type).
"""

from custos_attestors.workload.docker.api import (
    DEFAULT_API_TIMEOUT,
    DEFAULT_MAX_RESPONSE_BYTES,
    ContainerLookupError,
    DockerApi,
)
from custos_attestors.workload.docker.attestor import (
    DEFAULT_CACHE_ENTRIES,
    DEFAULT_CACHE_TTL,
    DEFAULT_DOCKER_SOCKET,
    DockerAttestorConfigError,
    DockerWorkloadAttestor,
    selectors_from_inspect,
)

__all__ = [
    "DEFAULT_API_TIMEOUT",
    "DEFAULT_CACHE_ENTRIES",
    "DEFAULT_CACHE_TTL",
    "DEFAULT_DOCKER_SOCKET",
    "DEFAULT_MAX_RESPONSE_BYTES",
    "ContainerLookupError",
    "DockerApi",
    "DockerAttestorConfigError",
    "DockerWorkloadAttestor",
    "selectors_from_inspect",
]
