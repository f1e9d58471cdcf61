"""A client of the admin API over the server's Unix socket (what the CLI uses).

Errors come back as custos errors: the server sends ``"<code>: <message>"`` as
the status message, which becomes :class:`AdminApiError` with that ``code``; a
socket nobody answers on becomes :class:`AdminUnreachableError`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TypeVar

from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from custos._proto import admin_v1_grpc, admin_v1_pb2, types_v1_pb2
from custos.errors import CustosError
from custos.server.config import AdminConfig

#: The socket of a server configured with the defaults (config key ``admin.socket``).
DEFAULT_ADMIN_SOCKET = str(AdminConfig().socket)
#: The environment variable naming the socket (a path or a ``unix://`` URL).
ADMIN_SOCKET_ENV = "CUSTOS_ADMIN_SOCKET"
#: Seconds one admin call may take (a rotation makes three keys, maybe in an HSM).
DEFAULT_TIMEOUT = 60.0

_CODED = re.compile(r"([a-z0-9_]{1,64}): (.*)", re.DOTALL)

_Req = TypeVar("_Req")
_Rep = TypeVar("_Rep")


class AdminApiError(CustosError):
    """The server refused an admin call; ``code`` is the server's error code."""

    code = "admin_api"

    def __init__(self, message: str, *, code: str | None = None, status: Status) -> None:
        super().__init__(message, code=code)
        self.status = status


class AdminUnreachableError(CustosError):
    """Nothing answers on the admin socket (server not running, wrong path, no access)."""

    code = "admin_unreachable"


def socket_path(value: str | os.PathLike[str] | None = None) -> str:
    """The socket path from ``value`` (a path, ``unix:PATH`` or ``unix://PATH``),
    else from ``$CUSTOS_ADMIN_SOCKET``, else the default."""
    text = os.fspath(value) if value is not None else os.environ.get(ADMIN_SOCKET_ENV, "")
    text = text or DEFAULT_ADMIN_SOCKET
    if text.startswith("unix://"):
        text = text[len("unix://") :]
    elif text.startswith("unix:"):
        text = text[len("unix:") :]
    if not text.startswith("/"):
        # gRPC's unix: URLs are absolute; a relative path is taken from here.
        text = os.path.abspath(text)
    return text


class AdminClient:
    """``async with AdminClient(path) as admin: await admin.count_entries()``."""

    def __init__(
        self, path: str | os.PathLike[str] | None = None, *, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.path = socket_path(path)
        self.timeout = timeout
        self._channel = Channel(path=self.path)
        self._entries = admin_v1_grpc.EntriesStub(self._channel)
        self._tokens = admin_v1_grpc.TokensStub(self._channel)
        self._agents = admin_v1_grpc.AgentsStub(self._channel)
        self._server = admin_v1_grpc.ServerStub(self._channel)

    async def __aenter__(self) -> AdminClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    async def _call(self, method: Callable[..., Awaitable[_Rep]], request: object) -> _Rep:
        try:
            return await method(request, timeout=self.timeout)
        except GRPCError as e:
            raise _from_status(e) from None
        except (OSError, StreamTerminatedError) as e:
            reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
            raise AdminUnreachableError(
                f"cannot reach the admin socket {self.path}: {reason} "
                "(is the server running? --admin-socket / CUSTOS_ADMIN_SOCKET)"
            ) from None
        except TimeoutError:
            raise AdminUnreachableError(
                f"the admin socket {self.path} did not answer within {self.timeout:g} s"
            ) from None

    # -- entries ----------------------------------------------------------------

    async def create_entry(self, entry: types_v1_pb2.Entry) -> types_v1_pb2.Entry:
        return await self._call(self._entries.CreateEntry, entry)

    async def update_entry(self, entry: types_v1_pb2.Entry) -> types_v1_pb2.Entry:
        return await self._call(self._entries.UpdateEntry, entry)

    async def get_entry(self, entry_id: str) -> types_v1_pb2.Entry:
        return await self._call(self._entries.GetEntry, admin_v1_pb2.EntryId(id=entry_id))

    async def list_entries(
        self,
        *,
        parent_id: str = "",
        spiffe_id: str = "",
        selectors: tuple[str, ...] = (),
        match: str = "",
    ) -> list[types_v1_pb2.Entry]:
        request = admin_v1_pb2.ListEntriesRequest(
            parent_id=parent_id, spiffe_id=spiffe_id, selectors=selectors, match=match
        )
        return list((await self._call(self._entries.ListEntries, request)).entries)

    async def delete_entry(self, entry_id: str, *, revision: int = 0) -> None:
        request = admin_v1_pb2.DeleteEntryRequest(id=entry_id, revision=revision)
        await self._call(self._entries.DeleteEntry, request)

    async def count_entries(self) -> int:
        reply = await self._call(self._entries.CountEntries, admin_v1_pb2.CountEntriesRequest())
        return reply.count

    # -- tokens, agents, server -------------------------------------------------

    async def generate_token(
        self, *, ttl: int = 0, spiffe_id: str = ""
    ) -> admin_v1_pb2.GenerateTokenResponse:
        request = admin_v1_pb2.GenerateTokenRequest(ttl=ttl, spiffe_id=spiffe_id)
        return await self._call(self._tokens.GenerateToken, request)

    async def list_agents(self) -> list[admin_v1_pb2.Agent]:
        reply = await self._call(self._agents.ListAgents, admin_v1_pb2.ListAgentsRequest())
        return list(reply.agents)

    async def get_agent(self, agent_id: str) -> admin_v1_pb2.Agent:
        return await self._call(self._agents.GetAgent, admin_v1_pb2.AgentId(id=agent_id))

    async def evict_agent(self, agent_id: str) -> admin_v1_pb2.Agent:
        return await self._call(self._agents.EvictAgent, admin_v1_pb2.AgentId(id=agent_id))

    async def ban_agent(self, agent_id: str) -> admin_v1_pb2.Agent:
        return await self._call(self._agents.BanAgent, admin_v1_pb2.AgentId(id=agent_id))

    async def get_bundle(self) -> types_v1_pb2.Bundle:
        return await self._call(self._server.GetBundle, admin_v1_pb2.GetBundleRequest())

    async def rotate_keys(self) -> list[str]:
        reply = await self._call(self._server.RotateKeys, admin_v1_pb2.RotateKeysRequest())
        return list(reply.kids)


def _from_status(error: GRPCError) -> AdminApiError:
    text = " ".join((error.message or "").split())
    found = _CODED.fullmatch(text)
    if found:
        return AdminApiError(found.group(2), code=found.group(1), status=error.status)
    # Not from a custos server's error path (a grpclib or transport status).
    message = text or f"the admin API answered {error.status.name}"
    return AdminApiError(message, code=f"admin_{error.status.name.lower()}", status=error.status)
