"""The one place the Agent API turns errors into gRPC statuses (issue 8: "gRPC status
codes that say why").

:func:`status_for` chooses by error class, then by code; :func:`abort` ends a call
with that status and a one-line detail ``"<code>: <message>"`` (the form
:class:`custos.agent.client.errors.AgentApiError` parses). An error that is not a
custos error is a bug: the caller gets ``INTERNAL`` and ``"internal: internal
error"``, the traceback goes to the log, never to the wire.
"""

from __future__ import annotations

import logging
from typing import NoReturn

import grpc

from custos.errors import CustosError
from custos.identity.errors import InvalidIdentifierError
from custos.jwtsvid.errors import JwtArgumentError
from custos.plugin.errors import PluginError
from custos.server.datastore.errors import (
    DatastoreUnavailableError,
    InvalidEntryError,
    JoinTokenError,
    NotFoundError,
    RevisionConflictError,
)
from custos.server.issuer import IssuanceArgumentError, NotEntitledError
from custos.server.metrics import note_store_unavailable
from custos.server.signing_keys import SigningKeyError
from custos.wimse.errors import ReplayError, WitError, WptError
from custos.wimse.replay import ReplayCacheUnavailableError
from custos.x509.errors import CsrError

log = logging.getLogger("custos.server.agent_api")

#: Longest detail line sent (the message is for people; the code is for programs).
MAX_DETAIL = 300
#: The one message sent for a datastore (or replay cache) that is away.
_UNAVAILABLE_MESSAGE = "the datastore is unavailable"


class AgentApiAuthError(CustosError):
    """A call's credentials are missing, malformed or do not verify: UNAUTHENTICATED."""

    code = "unauthenticated"


class AgentApiForbiddenError(CustosError):
    """The caller is known but may not do this (banned agent): PERMISSION_DENIED."""

    code = "permission_denied"


class AgentApiArgumentError(CustosError):
    """A request message is malformed or out of bounds: INVALID_ARGUMENT."""

    code = "invalid_argument"


class AgentApiReopenError(CustosError):
    """A push stream ends so that the agent opens it again with its current
    credentials (the WIT that opened it expired, or the agent attested again):
    UNAVAILABLE, which every agent client retries."""

    code = "stream_reopen"


class AgentApiBusyError(CustosError):
    """Too many calls of one kind at once (push streams of one agent, pending
    attestations): RESOURCE_EXHAUSTED, retried by the agent with backoff."""

    code = "too_many_calls"


# First match wins: subclasses before their bases.
_BY_CLASS: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (ReplayCacheUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (DatastoreUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (AgentApiReopenError, grpc.StatusCode.UNAVAILABLE),
    (AgentApiBusyError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (AgentApiAuthError, grpc.StatusCode.UNAUTHENTICATED),
    (WitError, grpc.StatusCode.UNAUTHENTICATED),
    (WptError, grpc.StatusCode.UNAUTHENTICATED),  # WptReplayError included
    (ReplayError, grpc.StatusCode.UNAUTHENTICATED),  # a proof used by a concurrent call
    (AgentApiForbiddenError, grpc.StatusCode.PERMISSION_DENIED),
    (NotEntitledError, grpc.StatusCode.PERMISSION_DENIED),
    (JoinTokenError, grpc.StatusCode.PERMISSION_DENIED),
    (PluginError, grpc.StatusCode.PERMISSION_DENIED),  # node attestation refused
    (AgentApiArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (IssuanceArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (CsrError, grpc.StatusCode.INVALID_ARGUMENT),
    (JwtArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidEntryError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidIdentifierError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (RevisionConflictError, grpc.StatusCode.ABORTED),
    # No active signing key yet (a server just started, keys deleted behind its back):
    # the server cannot issue now; another server or a later try may.
    (SigningKeyError, grpc.StatusCode.UNAVAILABLE),
)
#: Codes whose class is too general to say (the datastore raises DatastoreError
#: with code "agent_banned").
_BY_CODE = {
    "agent_banned": grpc.StatusCode.PERMISSION_DENIED,
    "agent_evicted": grpc.StatusCode.PERMISSION_DENIED,
    "agent_not_found": grpc.StatusCode.UNAUTHENTICATED,
    "attestation_timeout": grpc.StatusCode.DEADLINE_EXCEEDED,  # custos.server.attestation
    "renew_by_attesting": grpc.StatusCode.FAILED_PRECONDITION,  # custos.server.attestation
}


def status_for(error: BaseException) -> grpc.StatusCode:
    """The gRPC status for ``error``: by class, then by code; anything else INTERNAL."""
    if isinstance(error, CustosError):
        by_code = _BY_CODE.get(error.code)
        if by_code is not None:
            return by_code
    for cls, status in _BY_CLASS:
        if isinstance(error, cls):
            return status
    return grpc.StatusCode.INTERNAL


def detail_for(error: BaseException) -> str:
    """The one line sent with the status: ``"<code>: <message>"``. For INTERNAL the
    message is generic (it may hold internals); a custos error keeps its stable code."""
    if not isinstance(error, CustosError):
        return "internal: internal error"
    if isinstance(error, DatastoreUnavailableError | ReplayCacheUnavailableError):
        # The driver's text names the database's host, port and user: for the log
        # (abort() writes it there), not for callers, who may not be authenticated.
        return f"{error.code}: {_UNAVAILABLE_MESSAGE}"
    if status_for(error) is grpc.StatusCode.INTERNAL:
        return f"{error.code}: internal error"
    message = " ".join(error.message.split())  # one line, whatever the message held
    return f"{error.code}: {message}"[:MAX_DETAIL]


async def abort(
    context: grpc.aio.ServicerContext[object, object], error: BaseException
) -> NoReturn:
    """End the call with ``error``'s status and detail line (never returns).

    A datastore or replay cache that is away is counted in
    ``custos_server_datastore_errors{operation=<method>}``. Unexpected errors are
    logged with their traceback; refusals at INFO, one line."""
    status = status_for(error)
    if isinstance(error, DatastoreUnavailableError | ReplayCacheUnavailableError):
        note_store_unavailable()  # counted by the metrics interceptor, for every method
    if status is grpc.StatusCode.INTERNAL:
        log.error("agent_api_internal_error", exc_info=error)
    elif isinstance(error, DatastoreUnavailableError | ReplayCacheUnavailableError):
        # The reason (the driver's line) stays here; the wire gets a fixed message.
        log.warning(
            "agent_api_refused status=%s code=%s reason=%s", status.name, error.code, error.message
        )
    else:
        log.info("agent_api_refused status=%s code=%s", status.name, getattr(error, "code", ""))
    await context.abort(status, detail_for(error))
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises
