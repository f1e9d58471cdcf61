"""The ``custos.agent.v1.Entries`` service: ``SyncEntries`` (decision 10, 0037).

One server stream per connected agent.  It sends the agent's whole entry set
(:func:`custos.server.entitlement.entries_for_agent`) at once, then waits on
the server's :class:`~custos.server.events.ChangeEvents`; each time the entry
generation moves it reads the set again and sends it only when the entries or
their revisions changed.  Bumps that arrive while a read is running are
answered by the next read (a burst of writes costs one or two reads, not one
per write).

The stream also wakes when the nearest ``expires_at`` of a sent entry passes
(an expiring entry is no write: nothing would bump) and at least every
:data:`RECHECK_SECONDS`, to look at the agent again: an evicted or banned
agent's stream ends with PERMISSION_DENIED at its next wake-up.

A stream never outlives the credentials that opened it: it ends (UNAVAILABLE,
``wit_expired`` / ``agent_reattested``) when the WIT it was opened with expires,
and when the agent attested again or renewed since (its ``updated_at`` moved);
the agent opens it again with its current WIT. One agent holds at most
:data:`MAX_STREAMS_PER_AGENT` push streams (both kinds together) on one server;
one more is RESOURCE_EXHAUSTED (decision 0056).
"""

from __future__ import annotations

import asyncio
import math
import time
import weakref
from collections import Counter
from collections.abc import Coroutine, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from custos._proto import agent_v1_pb2, agent_v1_pb2_grpc
from custos.server.agent_api.auth import Caller, authenticate_caller
from custos.server.agent_api.status import (
    AgentApiBusyError,
    AgentApiForbiddenError,
    AgentApiReopenError,
    abort,
)
from custos.server.datastore.records import Agent, RegistrationEntry
from custos.server.entitlement import entries_for_agent
from custos.server.wire import entry_to_proto

if TYPE_CHECKING:
    from custos.server.context import ServerContext

SERVICE = "custos.agent.v1.Entries"
#: Longest wait before a stream looks at its agent again (eviction and ban
#: write no entry, so nothing else would wake it).
RECHECK_SECONDS = 30.0
#: A short pause after a wake-up, so the bumps of one burst of writes (and the
#: local bump plus the NOTIFY of the same write) are answered by one read.
COALESCE_SECONDS = 0.02
#: Most push streams one agent may hold open on one server at once (an agent
#: needs two: SyncEntries and StreamBundle; the rest is room for reconnects).
MAX_STREAMS_PER_AGENT = 8

# Open push streams per agent ID, per server context (the loop's thread only).
_open_streams: weakref.WeakKeyDictionary[ServerContext, Counter[str]] = weakref.WeakKeyDictionary()


async def current_agent(ctx: ServerContext, agent: Agent) -> Agent:
    """The agent as stored now; refuses (PERMISSION_DENIED) once it is evicted or
    banned, and an agent that is gone (``agent_not_found``: UNAUTHENTICATED).
    The streams check it at every wake-up."""
    stored = await asyncio.to_thread(ctx.datastore.agents.get, agent.id)
    if stored.banned:
        raise AgentApiForbiddenError(f"agent {stored.id} is banned", code="agent_banned")
    if stored.evicted:
        raise AgentApiForbiddenError(
            f"agent {stored.id} was evicted; attest again", code="agent_evicted"
        )
    return stored


def still_current(caller: Caller, stored: Agent) -> None:
    """Raise :class:`AgentApiReopenError` once the stream's credentials are stale: its
    WIT expired (a stream must not serve past the credential that opened it), or the
    agent attested again or renewed since (an old key's stream must not live on)."""
    if time.time() >= caller.wit_expires_at:
        raise AgentApiReopenError(
            "the WIT this stream was opened with has expired; open it again",
            code="wit_expired",
        )
    if stored.updated_at > caller.agent.updated_at:
        raise AgentApiReopenError(
            f"agent {stored.id} attested again since this stream was opened; open it again",
            code="agent_reattested",
        )


async def wait_at_most(wait: Coroutine[Any, Any, int], timeout: float) -> None:
    """Await a ``ChangeEvents.wait_*`` for at most ``timeout`` seconds, then
    (after a change) :data:`COALESCE_SECONDS` more for the rest of its burst."""
    try:
        await asyncio.wait_for(wait, max(timeout, 0.0))
    except TimeoutError:
        return
    await asyncio.sleep(COALESCE_SECONDS)


@dataclass(frozen=True)
class Snapshot:
    """One read of what a push stream serves: the message to send, what decides
    whether it changed since the last one sent, and how long to wait at most
    before reading again without a bump."""

    message: Any
    state: Hashable
    wake_in: float


class PushStream:
    """The loop both push streams share: authenticate the call; then read, send
    when changed, wait for a bump (or ``wake_in``), look at the agent again."""

    service = ""
    method = ""

    def __init__(self, ctx: ServerContext, *, recheck_seconds: float = RECHECK_SECONDS) -> None:
        self._ctx = ctx
        self._recheck = recheck_seconds

    def _generation(self) -> int:
        raise NotImplementedError

    def _wait(self, seen: int) -> Coroutine[Any, Any, int]:
        raise NotImplementedError

    def _read(self, agent: Agent, generation: int) -> Snapshot:
        """Blocking (the datastore, the key stores): run in a worker thread."""
        raise NotImplementedError

    def _sent(self) -> None:
        """Called after each message sent."""

    async def serve(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        caller = await authenticate_caller(context, self._ctx, self.service, self.method)
        agent = caller.agent
        counts = _open_streams.setdefault(self._ctx, Counter())
        holder = str(agent.id)
        counted = False
        try:
            if counts[holder] >= MAX_STREAMS_PER_AGENT:
                raise AgentApiBusyError(
                    f"agent {holder} has {MAX_STREAMS_PER_AGENT} streams open on this server",
                    code="too_many_streams",
                )
            counts[holder] += 1
            counted = True
            sent: Hashable = None
            while True:
                # The generation is read before the datastore: a write landing
                # during the read bumps it past `seen` and brings us back here.
                seen = self._generation()
                snapshot = await asyncio.to_thread(self._read, agent, seen)
                if snapshot.state != sent:
                    await context.write(snapshot.message)
                    self._sent()
                    sent = snapshot.state
                wit_left = caller.wit_expires_at - time.time()
                await wait_at_most(self._wait(seen), min(snapshot.wake_in, self._recheck, wit_left))
                agent = await current_agent(self._ctx, agent)
                still_current(caller, agent)
        except Exception as e:  # noqa: BLE001 - every refusal and fault leaves through abort()
            # (a bug becomes INTERNAL with its traceback in the log, never on the wire)
            await abort(context, e)
        finally:
            if counted:
                counts[holder] -= 1
                if counts[holder] <= 0:
                    del counts[holder]


class EntriesServicer(PushStream, agent_v1_pb2_grpc.EntriesServicer):
    service = SERVICE
    method = "SyncEntries"

    async def SyncEntries(  # the gRPC method name
        self,
        request: agent_v1_pb2.SyncEntriesRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        await self.serve(context)

    def _generation(self) -> int:
        return self._ctx.events.entries_generation

    def _wait(self, seen: int) -> Coroutine[Any, Any, int]:
        return self._ctx.events.wait_entries(seen)

    def _read(self, agent: Agent, generation: int) -> Snapshot:
        # The feed position first: the set read after it reflects at least that change.
        seq = self._ctx.datastore.entries.last_change_seq()
        entries = entries_for_agent(self._ctx.datastore, agent, self._ctx.server_id)
        return Snapshot(
            agent_v1_pb2.EntriesUpdate(
                entries=[entry_to_proto(e) for e in entries], change_seq=seq
            ),
            tuple((e.id, e.revision) for e in entries),
            _next_expiry(entries),
        )

    def _sent(self) -> None:
        self._ctx.metrics.entry_updates.inc()


def _next_expiry(entries: list[RegistrationEntry]) -> float:
    """Seconds until the first of ``entries`` expires (expiry writes nothing, so
    no bump would tell the stream to drop it)."""
    now = time.time()
    return min((e.expires_at - now for e in entries if e.expires_at is not None), default=math.inf)


def register(server: grpc.aio.Server, ctx: ServerContext) -> None:
    """Serve ``custos.agent.v1.Entries`` on ``server``."""
    agent_v1_pb2_grpc.add_EntriesServicer_to_server(EntriesServicer(ctx), server)  # type: ignore[no-untyped-call]


__all__ = [
    "COALESCE_SECONDS",
    "MAX_STREAMS_PER_AGENT",
    "RECHECK_SECONDS",
    "SERVICE",
    "EntriesServicer",
    "PushStream",
    "Snapshot",
    "current_agent",
    "register",
    "still_current",
    "wait_at_most",
]
