"""One error type for everything the Agent API refuses (issue 8).

The server sends, for a refused call, a gRPC status and a one-line detail that starts
with the custos error code (``"<code>: <message>"``, :mod:`custos.server.agent_api.status`);
for a refused item of a batch, an ``ItemError{code, message}``. Both arrive here as an
:class:`AgentApiError` whose ``code`` is the server's custos code and whose ``status`` is
the gRPC status (``OK`` for a per-item refusal, whose call as a whole succeeded). Callers
branch on ``code`` (stable) or ``retryable``, never on the message text.
"""

from __future__ import annotations

import re

import grpc

from custos.errors import CustosError

# Statuses worth trying again later (the server or the database is away, or busy):
# the agent keeps its current credentials and retries with backoff.
_RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
# A custos code: lower-case words with "_" (custos.errors); anything else in a
# status detail is not one of ours (a proxy, grpc's own "failed to connect").
_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_MAX_MESSAGE = 512


class AgentApiError(CustosError):
    """The Agent API refused a call or one item of a batch.

    ``code`` is the server's custos error code when it sent one, else
    ``agent_api_<status name lower-case>`` (e.g. ``agent_api_unavailable`` when the
    connection failed). ``status`` is the call's gRPC status.
    """

    code = "agent_api_error"

    def __init__(self, message: str, *, status: grpc.StatusCode, code: str | None = None) -> None:
        super().__init__(message[:_MAX_MESSAGE], code=code or _status_code(status))
        self.status = status

    @property
    def retryable(self) -> bool:
        """True when trying again later may succeed (server or database unavailable)."""
        return self.status in _RETRYABLE

    @classmethod
    def from_rpc_error(cls, error: grpc.aio.AioRpcError) -> AgentApiError:
        """Translate a refused grpc.aio call (raise it ``from`` the original)."""
        return cls.from_status(error.code(), error.details() or "")

    @classmethod
    def from_status(cls, status: grpc.StatusCode, details: str) -> AgentApiError:
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
            status=grpc.StatusCode.OK,
            code=code if _CODE.fullmatch(code) else None,
        )


def _status_code(status: grpc.StatusCode) -> str:
    return f"agent_api_{status.name.lower()}"
