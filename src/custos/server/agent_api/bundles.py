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

import math
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import grpc

from custos._proto import agent_v1_pb2, agent_v1_pb2_grpc
from custos.server.agent_api.entries import PushStream, Snapshot
from custos.server.datastore.records import Agent
from custos.server.wire import bundle_to_proto

if TYPE_CHECKING:
    from custos.server.context import ServerContext

SERVICE = "custos.agent.v1.Bundles"


class BundlesServicer(PushStream, agent_v1_pb2_grpc.BundlesServicer):
    service = SERVICE
    method = "StreamBundle"
    _cached: tuple[int, Snapshot] | None = None

    async def StreamBundle(  # the gRPC method name
        self,
        request: agent_v1_pb2.StreamBundleRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        await self.serve(context)

    def _generation(self) -> int:
        return self._ctx.events.bundle_generation

    def _wait(self, seen: int) -> Coroutine[Any, Any, int]:
        return self._ctx.events.wait_bundle(seen)

    def _read(self, agent: Agent, generation: int) -> Snapshot:
        # One bundle per generation for every stream of this server: a rotation
        # wakes every agent's stream at once, and each read asks the key stores
        # (an HSM serialises them) for every key.
        cached = self._cached
        if cached is not None and cached[0] == generation:
            return cached[1]
        bundle = self._ctx.bundle()
        # Compared without the sequence number: a bump that changed nothing sends nothing.
        snapshot = Snapshot(bundle_to_proto(bundle, generation), bundle.to_spiffe_json(), math.inf)
        self._cached = (generation, snapshot)  # a plain store: racing readers agree
        return snapshot


def register(server: grpc.aio.Server, ctx: ServerContext) -> None:
    """Serve ``custos.agent.v1.Bundles`` on ``server``."""
    agent_v1_pb2_grpc.add_BundlesServicer_to_server(BundlesServicer(ctx), server)  # type: ignore[no-untyped-call]


__all__ = ["SERVICE", "BundlesServicer", "register"]
