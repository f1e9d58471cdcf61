"""The ``custos.admin.v1`` servicers: entries, join tokens, agents, the bundle
and key rotation.

They only raise custos errors; :mod:`custos.server.admin.server` checks the
caller, times the call and turns errors into gRPC statuses.  The datastore and
the key stores are synchronous and run in worker threads.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, TypeVar

from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from custos._numbers import finite_number
from custos._proto import admin_v1_grpc, admin_v1_pb2, types_v1_pb2
from custos.identity import Selector, SpiffeId, coerce_spiffe_id
from custos.plugin.catalog import AGENT_ID_PREFIX
from custos.server.context import ServerContext
from custos.server.datastore.errors import InvalidEntryError
from custos.server.datastore.records import RegistrationEntry, member_id
from custos.server.datastore.server_names import normal_dns_name
from custos.server.wire import (
    agent_to_proto,
    bundle_to_proto,
    entry_fields_from_proto,
    entry_to_proto,
)

log = logging.getLogger(__name__)

#: A join token lives 10 minutes unless asked otherwise (SPIRE's default) ...
DEFAULT_JOIN_TOKEN_TTL = 600.0
#: ... and at most a day: it is a bootstrap secret, handed over and used at once.
MAX_JOIN_TOKEN_TTL = 86400.0
#: SPIFFE IDs under this path are the servers' and the agents' own (decision 0038).
RESERVED_PATH = "/custos"

_Request = TypeVar("_Request")


async def _request(stream: Stream[_Request, Any]) -> _Request:
    message = await stream.recv_message()
    if message is None:  # the client closed its side without a message
        raise GRPCError(Status.INVALID_ARGUMENT, "invalid_request: no request message")
    return message


def _caller(stream: Stream[Any, Any]) -> str:
    """Who called, for the log: the kernel's uid (see server.PeerCredentials)."""
    uid = getattr(stream.peer.addr(), "uid", None)
    return f"uid {uid}" if uid is not None else "an unknown caller"


def check_not_reserved(spiffe_id: SpiffeId) -> None:
    """Refuse an entry for the servers' or the agents' own IDs: a workload
    holding one could call the Agent API as that agent."""
    if spiffe_id.path == RESERVED_PATH or spiffe_id.path.startswith(RESERVED_PATH + "/"):
        raise InvalidEntryError(
            f"spiffe_id {spiffe_id} is under {RESERVED_PATH}/, reserved for custos "
            "servers and agents",
            code="reserved_spiffe_id",
        )


class _Part:
    def __init__(self, ctx: ServerContext) -> None:
        self._ctx = ctx

    def _default_ttls(self) -> dict[str, Any]:
        config = self._ctx.config
        return {
            "x509_svid_ttl": config.x509_svid.default_ttl.total_seconds(),
            "jwt_svid_ttl": config.jwt_svid.default_ttl.total_seconds(),
            "wit_ttl": config.wit.default_ttl.total_seconds(),
        }

    async def _entry_fields(self, message: types_v1_pb2.Entry) -> dict[str, Any]:
        """The entry's fields, TTLs of 0 ("not given") set to the server's
        defaults, refused if it names a server's DNS name or a reserved ID."""
        fields = entry_fields_from_proto(message)
        for name, default in self._default_ttls().items():
            if fields[name] == 0:
                fields[name] = default
        check_not_reserved(coerce_spiffe_id(fields["spiffe_id"]))
        # This server's name and every name the servers of this datastore recorded at
        # start: they may be configured differently, and an agent trusts each one.
        recorded = await asyncio.to_thread(self._ctx.datastore.server_names.names)
        servers = recorded | {normal_dns_name(self._ctx.config.agent_api.dns_name)}
        taken = sorted(servers.intersection(normal_dns_name(str(n)) for n in fields["dns_names"]))
        if taken:
            raise InvalidEntryError(
                f"dns name {taken[0]!r} is a custos server's own (agent_api.dns_name); "
                "no workload may hold it",
                code="reserved_dns_name",
            )
        return fields


class EntriesService(_Part, admin_v1_grpc.EntriesBase):
    async def CreateEntry(self, stream: Stream[types_v1_pb2.Entry, types_v1_pb2.Entry]) -> None:
        fields = await self._entry_fields(await _request(stream))
        entry = await asyncio.to_thread(self._ctx.datastore.entries.create, **fields)
        self._ctx.events.entries_changed()
        log.info("admin: %s created entry %s for %s", _caller(stream), entry.id, entry.spiffe_id)
        await stream.send_message(entry_to_proto(entry))

    async def UpdateEntry(self, stream: Stream[types_v1_pb2.Entry, types_v1_pb2.Entry]) -> None:
        message = await _request(stream)
        if message.revision <= 0:
            raise InvalidEntryError(
                "an update needs the revision it was read at (custos entry show)",
                code="revision_required",
            )
        draft = RegistrationEntry(
            id=message.id,
            revision=message.revision,
            change_seq=0,
            **(await self._entry_fields(message)),
        )
        entry = await asyncio.to_thread(self._ctx.datastore.entries.update, draft)
        self._ctx.events.entries_changed()
        log.info(
            "admin: %s updated entry %s to revision %d", _caller(stream), entry.id, entry.revision
        )
        await stream.send_message(entry_to_proto(entry))

    async def GetEntry(self, stream: Stream[admin_v1_pb2.EntryId, types_v1_pb2.Entry]) -> None:
        message = await _request(stream)
        entry = await asyncio.to_thread(self._ctx.datastore.entries.get, message.id)
        await stream.send_message(entry_to_proto(entry))

    async def ListEntries(
        self, stream: Stream[admin_v1_pb2.ListEntriesRequest, admin_v1_pb2.ListEntriesResponse]
    ) -> None:
        message = await _request(stream)
        found = await asyncio.to_thread(
            self._ctx.datastore.entries.list,
            parent_id=message.parent_id or None,
            spiffe_id=message.spiffe_id or None,
            selectors=list(message.selectors) or None,
            match=message.match or "exact",  # type: ignore[arg-type]  # the datastore checks it
        )
        await stream.send_message(
            admin_v1_pb2.ListEntriesResponse(entries=[entry_to_proto(e) for e in found])
        )

    async def DeleteEntry(
        self, stream: Stream[admin_v1_pb2.DeleteEntryRequest, admin_v1_pb2.DeleteEntryResponse]
    ) -> None:
        message = await _request(stream)
        await asyncio.to_thread(
            self._ctx.datastore.entries.delete, message.id, revision=message.revision or None
        )
        self._ctx.events.entries_changed()
        log.info("admin: %s deleted entry %s", _caller(stream), message.id)
        await stream.send_message(admin_v1_pb2.DeleteEntryResponse())

    async def CountEntries(
        self, stream: Stream[admin_v1_pb2.CountEntriesRequest, admin_v1_pb2.CountEntriesResponse]
    ) -> None:
        await _request(stream)
        count = await asyncio.to_thread(self._ctx.datastore.entries.count)
        await stream.send_message(admin_v1_pb2.CountEntriesResponse(count=count))


class TokensService(_Part, admin_v1_grpc.TokensBase):
    async def GenerateToken(
        self, stream: Stream[admin_v1_pb2.GenerateTokenRequest, admin_v1_pb2.GenerateTokenResponse]
    ) -> None:
        message = await _request(stream)
        ttl = finite_number(
            message.ttl or self._ctx.config.join_token.default_ttl.total_seconds(),
            name="join token ttl",
            minimum=1,
            maximum=MAX_JOIN_TOKEN_TTL,
        )
        td = self._ctx.trust_domain
        # Checked before anything is written: a bad alias must not leave a token behind.
        alias_id = member_id(message.spiffe_id, td, "spiffe_id") if message.spiffe_id else None
        if alias_id is not None:
            check_not_reserved(alias_id)
        ds = self._ctx.datastore
        token, secret = await asyncio.to_thread(ds.join_tokens.create, ttl)
        agent_id = SpiffeId(td, f"{AGENT_ID_PREFIX}join_token/{token.id}")
        reply = admin_v1_pb2.GenerateTokenResponse(
            token=secret,
            token_id=token.id,
            expires_at=int(token.expires_at),
            agent_id=str(agent_id),
        )
        if alias_id is not None:
            # SPIRE's `token generate -spiffeID`: the agent's alias, selected by its ID.
            alias = await asyncio.to_thread(
                ds.entries.create,
                alias_id,
                agent_id,
                [Selector("spiffe_id", str(agent_id))],
                **self._default_ttls(),
            )
            self._ctx.events.entries_changed()
            reply.alias.CopyFrom(entry_to_proto(alias))
        log.info("admin: %s made join token %s (agent %s)", _caller(stream), token.id, agent_id)
        await stream.send_message(reply)


class AgentsService(_Part, admin_v1_grpc.AgentsBase):
    async def ListAgents(
        self, stream: Stream[admin_v1_pb2.ListAgentsRequest, admin_v1_pb2.ListAgentsResponse]
    ) -> None:
        await _request(stream)
        agents = await asyncio.to_thread(self._ctx.datastore.agents.list)
        await stream.send_message(
            admin_v1_pb2.ListAgentsResponse(agents=[agent_to_proto(a) for a in agents])
        )

    async def GetAgent(self, stream: Stream[admin_v1_pb2.AgentId, admin_v1_pb2.Agent]) -> None:
        agent_id = coerce_spiffe_id((await _request(stream)).id)
        agent = await asyncio.to_thread(self._ctx.datastore.agents.get, agent_id)
        await stream.send_message(agent_to_proto(agent))

    async def EvictAgent(self, stream: Stream[admin_v1_pb2.AgentId, admin_v1_pb2.Agent]) -> None:
        agent_id = coerce_spiffe_id((await _request(stream)).id)
        agent = await asyncio.to_thread(self._ctx.datastore.agents.evict, agent_id)
        log.warning("admin: %s evicted agent %s", _caller(stream), agent_id)
        # Wakes this server's entry streams, which re-check their agent: its stream ends now.
        self._ctx.events.entries_changed()
        await stream.send_message(agent_to_proto(agent))

    async def BanAgent(self, stream: Stream[admin_v1_pb2.AgentId, admin_v1_pb2.Agent]) -> None:
        agent_id = coerce_spiffe_id((await _request(stream)).id)
        agent = await asyncio.to_thread(self._ctx.datastore.agents.ban, agent_id)
        log.warning("admin: %s banned agent %s", _caller(stream), agent_id)
        # Wakes this server's entry streams, which re-check their agent: its stream ends now.
        self._ctx.events.entries_changed()
        await stream.send_message(agent_to_proto(agent))


class ServerService(_Part, admin_v1_grpc.ServerBase):
    async def GetBundle(
        self, stream: Stream[admin_v1_pb2.GetBundleRequest, types_v1_pb2.Bundle]
    ) -> None:
        await _request(stream)
        bundle = await asyncio.to_thread(self._ctx.bundle)
        await stream.send_message(bundle_to_proto(bundle, self._ctx.events.bundle_generation))

    async def RotateKeys(
        self, stream: Stream[admin_v1_pb2.RotateKeysRequest, admin_v1_pb2.RotateKeysResponse]
    ) -> None:
        await _request(stream)
        kids: list[str] = []
        try:
            for keys in (self._ctx.ca_keys, self._ctx.jwt_keys, self._ctx.wit_keys):
                kids.append((await asyncio.to_thread(keys.rotate_now)).kid)
        finally:
            # Even a partial rotation changed the bundle.
            if kids:
                self._ctx.events.bundle_changed()
        log.warning("admin: %s rotated the signing keys now: %s", _caller(stream), ", ".join(kids))
        await stream.send_message(admin_v1_pb2.RotateKeysResponse(kids=kids))


def servicers(
    ctx: ServerContext,
) -> tuple[EntriesService, TokensService, AgentsService, ServerService]:
    """Every admin servicer, for one grpclib ``Server``."""
    return EntriesService(ctx), TokensService(ctx), AgentsService(ctx), ServerService(ctx)
