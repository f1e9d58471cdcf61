"""The workload client's errors: one tree under :class:`WorkloadApiError`.

The agent answers a refused call with a gRPC status and a one-line detail;
signing calls refused for the caller's own input send ``"<custos code>: <message>"``
(decision 0044). Both arrive here as a :class:`WorkloadApiError` whose ``status``
is the gRPC status and whose ``code`` is the agent's custos code when it sent one,
else ``workload_api_<status name lower-case>``. Callers branch on the class or
on ``code`` (stable), never on the message text.
"""

from __future__ import annotations

import re

import grpc

from custos.errors import CustosError

#: A custos code: lower-case words joined by "_" (custos.errors); anything else in a
#: status detail (grpc's own "failed to connect ...") is not one.
_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_MAX_MESSAGE = 512


class WorkloadApiError(CustosError):
    """The agent refused a call, or could not be reached.

    ``status`` is the call's gRPC status (``UNKNOWN`` for an answer that could
    not be used); ``code`` a stable custos code.
    """

    code = "workload_api_error"

    def __init__(
        self, message: str, *, status: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
        code: str | None = None,
    ) -> None:
        super().__init__(message[:_MAX_MESSAGE], code=code)
        self.status = status


class WorkloadEndpointError(WorkloadApiError, ValueError):
    """No usable socket address (``SPIFFE_ENDPOINT_SOCKET`` unset or not ``unix:``)."""

    code = "workload_endpoint_invalid"


class InvalidRequestError(WorkloadApiError, ValueError):
    """A call this client refuses to send (a request no agent would accept)."""

    code = "workload_api_invalid_request"


class WorkloadApiUnavailableError(WorkloadApiError):
    """The agent did not answer (no socket, agent stopped, deadline passed)."""

    code = "workload_api_unavailable"


class WorkloadApiDeniedError(WorkloadApiError):
    """PERMISSION_DENIED: this process has no identity there (or not the one named)."""

    code = "workload_api_permission_denied"


class NotExportableError(WorkloadApiError):
    """FAILED_PRECONDITION: the call hands out a private key and every identity of
    this process keeps its key in the agent (use the signing calls instead)."""

    code = "workload_api_not_exportable"


class WorkloadApiResponseError(WorkloadApiError):
    """The agent answered with something this client cannot use."""

    code = "workload_api_bad_response"


_BY_STATUS: dict[grpc.StatusCode, type[WorkloadApiError]] = {
    grpc.StatusCode.UNAVAILABLE: WorkloadApiUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: WorkloadApiUnavailableError,
    grpc.StatusCode.PERMISSION_DENIED: WorkloadApiDeniedError,
    grpc.StatusCode.FAILED_PRECONDITION: NotExportableError,
}


def error_from_status(status: grpc.StatusCode, details: str, target: str) -> WorkloadApiError:
    """The error for a refused call (raise it ``from`` the grpc error)."""
    kind = _BY_STATUS.get(status, WorkloadApiError)
    details = " ".join(details.split())  # one line, whatever the peer sent
    if kind is WorkloadApiUnavailableError:
        verb = "did not answer in time" if status is grpc.StatusCode.DEADLINE_EXCEEDED else (
            "cannot be reached")
        # grpc's own detail names the socket and the errno (ENOENT, ECONNREFUSED).
        return kind(f"the agent at {target} {verb} (is it running?): {details}", status=status,
                    code=f"workload_api_{status.name.lower()}")
    code, _, rest = details.partition(": ")
    if _CODE.fullmatch(code):
        return kind(rest or code, status=status, code=code)
    fallback = None if kind is not WorkloadApiError else f"workload_api_{status.name.lower()}"
    return kind(details or status.name.lower(), status=status, code=fallback)


__all__ = [
    "InvalidRequestError",
    "NotExportableError",
    "WorkloadApiDeniedError",
    "WorkloadApiError",
    "WorkloadApiResponseError",
    "WorkloadApiUnavailableError",
    "WorkloadEndpointError",
    "error_from_status",
]
