"""Where the agent listens: ``SPIFFE_ENDPOINT_SOCKET`` or an address given.

The SPIFFE Workload Endpoint spec names the socket by URI; gRPC's naming has two
Unix forms, and both are accepted (decision 0052):

- ``unix:///run/custos/agent.sock`` (or ``unix:/run/...``): an absolute path;
- ``unix:agent.sock``: a path relative to the working directory;
- a plain absolute path or a :class:`pathlib.Path` (Python callers).

Anything else is a :class:`~custos.client.errors.WorkloadEndpointError`: ``tcp://``
(the agent serves a Unix socket only: it identifies callers by their kernel
credentials), a host (``unix://host/path``), a query, a fragment, user info.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from custos.client.errors import WorkloadEndpointError

#: The environment variable SPIFFE clients read (SPIFFE Workload Endpoint spec).
ENDPOINT_ENV = "SPIFFE_ENDPOINT_SOCKET"
#: Longest usable sun_path (Linux: 108 bytes with the NUL).
_MAX_PATH = 107


@dataclass(frozen=True)
class Endpoint:
    """The agent's socket: ``path`` as given (absolute or relative) and the URI form."""

    path: str

    @property
    def uri(self) -> str:
        return f"unix://{self.path}" if self.path.startswith("/") else f"unix:{self.path}"

    @property
    def grpc_target(self) -> str:
        return f"unix:{self.path}"

    def __str__(self) -> str:
        return self.uri


def _bad(value: str, why: str) -> WorkloadEndpointError:
    return WorkloadEndpointError(f"workload API socket {value!r}: {why} (expected unix:///path)")


def parse_endpoint(value: str | os.PathLike[str]) -> Endpoint:
    """The :class:`Endpoint` for an address (see the module docstring)."""
    if isinstance(value, os.PathLike):
        return _checked(os.fspath(value), str(value))
    if not isinstance(value, str):
        raise WorkloadEndpointError(f"workload API socket must be a string, not "
                                    f"{type(value).__name__}")
    if value.startswith("/"):
        return _checked(value, value)
    try:
        parts = urlsplit(value)
    except ValueError as e:
        raise _bad(value, "not a URI") from e
    if parts.scheme != "unix":
        scheme = parts.scheme or "no scheme"
        raise _bad(value, f"{scheme} is not a Unix socket (the agent serves a Unix socket only)")
    if parts.query or parts.fragment or "?" in value or "#" in value:
        raise _bad(value, "a query or fragment is not allowed")
    if parts.netloc:
        raise _bad(value, "a host is not allowed")
    return _checked(parts.path, value)


def _checked(path: str, value: str) -> Endpoint:
    if not path:
        raise _bad(value, "no socket path")
    if "\x00" in path or len(path.encode("utf-8", "surrogateescape")) > _MAX_PATH:
        raise _bad(value, f"not a usable socket path (at most {_MAX_PATH} bytes, no NUL)")
    return Endpoint(path)


def endpoint_from_env(given: str | os.PathLike[str] | None = None) -> Endpoint:
    """``given``, else ``SPIFFE_ENDPOINT_SOCKET``; neither is one clear error."""
    if given is None or given == "":
        given = os.environ.get(ENDPOINT_ENV, "")
        if not given:
            raise WorkloadEndpointError(
                f"no workload API socket: pass one (--socket unix:///path) or set {ENDPOINT_ENV}",
                code="workload_endpoint_missing",
            )
    return parse_endpoint(given)


__all__ = ["ENDPOINT_ENV", "Endpoint", "endpoint_from_env", "parse_endpoint"]
