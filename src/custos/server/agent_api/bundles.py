"""The ``custos.agent.v1.Bundles`` service: ``StreamBundle`` (decision 0037).

The trust bundle now, then again each time it changes: the stream waits on the
bundle generation of :class:`~custos.server.events.ChangeEvents` (bumped by
this server's key maintenance, by other servers' key changes through
PostgreSQL NOTIFY, and by the safety poll), rebuilds the bundle and sends it
when its SPIFFE document differs from the one sent last.

``sequence_number`` is the server's bundle generation, as in the
``AgentIdentity`` of ``AttestAgent``: it grows on one server, but is not
comparable between servers or across restarts — an agent compares bundles by
content, never by number.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import grpc

from custos._proto import agent_v1_pb2, agent_v1_pb2_grpc
from custos.server.agent_api.entries import PushStream, current_agent, wait_at_most
from custos.server.datastore.records import Agent
from custos.server.wire import bundle_to_proto

if TYPE_CHECKING:
    from custos.server.context import ServerContext

SERVICE = "custos.agent.v1.Bundles"


class BundlesServicer(PushStream, agent_v1_pb2_grpc.BundlesServicer):
    service = SERVICE
    method = "StreamBundle"

    async def StreamBundle(  # the gRPC method name
        self,
        request: agent_v1_pb2.StreamBundleRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        await self.serve(context)

    async def _stream(self, agent: Agent, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        ctx = self._ctx
        events = ctx.events
        sent: str | None = None
        while True:
            seen = events.bundle_generation
            bundle = await asyncio.to_thread(ctx.bundle)
            document = bundle.to_spiffe_json()
            if document != sent:
                await context.write(bundle_to_proto(bundle, seen))
                sent = document
            await wait_at_most(events.wait_bundle(seen), self._recheck)
            agent = await current_agent(ctx, agent)


def register(server: grpc.aio.Server, ctx: ServerContext) -> None:
    """Serve ``custos.agent.v1.Bundles`` on ``server``."""
    agent_v1_pb2_grpc.add_BundlesServicer_to_server(BundlesServicer(ctx), server)  # type: ignore[no-untyped-call]


__all__ = ["SERVICE", "BundlesServicer", "register"]
