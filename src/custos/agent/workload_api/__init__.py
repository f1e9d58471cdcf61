"""The agent's Unix socket: the SPIFFE Workload API and custos' WIMSE signing API.

See docs/workload-api.md; decisions 0044 (callers, attestation, statuses) and
0045 (limits).
"""

from custos.agent.workload_api.limits import WorkloadApiConfigError, WorkloadApiLimits
from custos.agent.workload_api.peer import Caller, process_exited
from custos.agent.workload_api.server import (
    SECURITY_HEADER,
    SIGNING_SERVICE,
    SPIFFE_SERVICE,
    WorkloadApiServer,
    WorkloadSocketError,
    serve_workload_api,
)
from custos.agent.workload_api.sources import (
    EXPORTABLE,
    IdentitySource,
    ServedIdentity,
    WorkloadAttestation,
)

#: The default socket (``SPIFFE_ENDPOINT_SOCKET=unix:///run/custos/agent.sock``).
DEFAULT_SOCKET = "/run/custos/agent.sock"

__all__ = [
    "DEFAULT_SOCKET",
    "EXPORTABLE",
    "SECURITY_HEADER",
    "SIGNING_SERVICE",
    "SPIFFE_SERVICE",
    "Caller",
    "IdentitySource",
    "ServedIdentity",
    "WorkloadApiConfigError",
    "WorkloadApiLimits",
    "WorkloadApiServer",
    "WorkloadAttestation",
    "WorkloadSocketError",
    "process_exited",
    "serve_workload_api",
]
