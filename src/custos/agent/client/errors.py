"""One error type for everything the Agent API refuses (issue 8).

The server sends, for a refused call, a gRPC status and a one-line detail that starts
with the custos error code (``"<code>: <message>"``, :mod:`custos.server.agent_api.status`);
for a refused item of a batch, an ``ItemError{code, message}``. Both arrive here as an
:class:`AgentApiError` whose ``code`` is the server's custos code and whose ``status`` is
the gRPC status (a :class:`grpclib.const.Status`; ``OK`` for a per-item refusal, whose
call as a whole succeeded). Callers branch on ``code`` (stable) or ``retryable``, never on
the message text. :func:`translate` turns whatever a grpclib call raises (a status, a
lost connection, a TLS failure, the deadline) into one :class:`AgentApiError`.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Awaitable
from typing import TypeVar

from grpclib.const import Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError
from h2.exceptions import H2Error

from custos.errors import CustosError

# Statuses worth trying again later (the server or the database is away, or busy):
# the agent keeps its current credentials and retries with backoff.
_RETRYABLE = frozenset(
    {
        Status.UNAVAILABLE,
        Status.DEADLINE_EXCEEDED,
        Status.RESOURCE_EXHAUSTED,
    }
)
# A custos code: lower-case words with "_" (custos.errors); anything else in a
# status detail is not one of ours (a proxy, a library's own text).
_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_MAX_MESSAGE = 512


class AgentApiError(CustosError):
    """The Agent API refused a call or one item of a batch.

    ``code`` is the server's custos error code when it sent one, else
    ``agent_api_<status name lower-case>`` (e.g. ``agent_api_unavailable`` when the
    connection failed). ``status`` is the call's gRPC status.
    """

    code = "agent_api_error"

    def __init__(self, message: str, *, status: Status, code: str | None = None) -> None:
        super().__init__(message[:_MAX_MESSAGE], code=code or _status_code(status))
        self.status = status

    @property
    def retryable(self) -> bool:
        """True when trying again later may succeed (server or database unavailable)."""
        return self.status in _RETRYABLE

    @classmethod
    def from_grpc_error(cls, error: GRPCError) -> AgentApiError:
        """Translate a refused grpclib call (raise it ``from`` the original)."""
        return cls.from_status(error.status, error.message or "")

    @classmethod
    def from_status(cls, status: Status, details: str) -> AgentApiError:
        """Translate a status and its detail line (``"<code>: <message>"`` from a custos server)."""
        code, _, rest = details.partition(": ")
        if _CODE.fullmatch(code):
            return cls(rest or code, status=status, code=code)
        return cls(details or status.name.lower(), status=status)

    @classmethod
    def from_item(cls, code: str, message: str) -> AgentApiError:
        """One refused item of a batch (the call itself succeeded: status ``OK``)."""
        return cls(
            message or code,
            status=Status.OK,
            code=code if _CODE.fullmatch(code) else None,
        )


class InvalidServerResponseError(AgentApiError):
    """The server's answer broke the protocol or does not fit the request (a
    certificate for another key, a chain that does not verify, a missing result,
    bytes that do not parse)."""

    code = "agent_api_bad_response"

    def __init__(self, message: str) -> None:
        super().__init__(message, status=Status.UNKNOWN, code=self.code)


def _status_code(status: Status) -> str:
    return f"agent_api_{status.name.lower()}"


#: What :func:`translate` turns into an AgentApiError (anything else is a bug, or a
#: cancellation, and propagates).
CALL_ERRORS = (GRPCError, StreamTerminatedError, ProtocolError, H2Error, OSError)


def translate(error: BaseException) -> AgentApiError | None:
    """The :class:`AgentApiError` for what a grpclib call raised, or ``None`` for an
    exception that is not a call's failure (raise it as it is)."""
    if isinstance(error, AgentApiError):
        return error
    if isinstance(error, GRPCError):
        return AgentApiError.from_grpc_error(error)
    if isinstance(error, asyncio.TimeoutError | TimeoutError):
        return AgentApiError("the call's deadline passed", status=Status.DEADLINE_EXCEEDED)
    if isinstance(error, StreamTerminatedError):
        return AgentApiError(
            f"the connection to the server was lost: {error}", status=Status.UNAVAILABLE
        )
    if isinstance(error, ssl.SSLError):
        return AgentApiError(
            f"TLS with the server failed: {error}", status=Status.UNAVAILABLE
        )
    if isinstance(error, OSError):
        return AgentApiError(
            f"could not reach the server: {error.strerror or error}", status=Status.UNAVAILABLE
        )
    if isinstance(error, ProtocolError | H2Error):
        return AgentApiError(f"HTTP/2 protocol error: {error}", status=Status.INTERNAL)
    return None


T = TypeVar("T")


async def own_task(operation: Awaitable[T]) -> T:
    """Await one grpclib operation (a call, a stream's send or receive) in a task of
    its own.

    grpclib interrupts an operation (the deadline, a reset stream, a lost connection)
    by cancelling the task inside it and never un-cancels it: run in the caller's
    task, that would leave the caller "cancelling" (``Task.cancelling()``), which
    ``asyncio.timeout`` and the agent's retry loops read as a real cancellation.
    Cancelling the caller still cancels the operation."""
    return await asyncio.ensure_future(operation)


async def run_call(operation: Awaitable[T]) -> T:
    """:func:`own_task`, its failure coming out as :class:`AgentApiError`."""
    try:
        return await own_task(operation)
    except CALL_ERRORS as e:
        raise translated(e) from e


def translated(error: BaseException) -> AgentApiError:
    """:func:`translate` for one of :data:`CALL_ERRORS`."""
    result = translate(error)
    assert result is not None  # every CALL_ERRORS type translates
    return result
