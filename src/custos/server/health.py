"""The Agent API's gRPC health service (``grpc.health.v1.Health``) on grpcio.

grpcio-health-checking and grpclib each ship a generated ``grpc/health/v1`` module,
and protobuf refuses the second one registered in a process ("duplicate symbol
'grpc.health.v1.HealthCheckRequest'", measured).  The server needs grpclib's (the
admin socket serves grpclib's health service), so the Agent API serves the same
protocol with grpclib's message classes through a grpcio generic handler
(decision 0040).  Clients of either stack see the standard service.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import grpc
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

SERVICE_NAME = "grpc.health.v1.Health"
#: The overall status of the server (the empty service name, as in the protocol).
OVERALL = ""

SERVING = HealthCheckResponse.SERVING
NOT_SERVING = HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = HealthCheckResponse.SERVICE_UNKNOWN


class AgentApiHealth:
    """Serving status per service name; ``Check`` and ``Watch`` answer from it."""

    def __init__(self) -> None:
        self._status: dict[str, HealthCheckResponse.ServingStatus.ValueType] = {
            OVERALL: NOT_SERVING
        }
        self._changed = asyncio.Event()

    def set(self, service: str, serving: bool) -> None:
        status = SERVING if serving else NOT_SERVING
        if self._status.get(service) != status:
            self._status[service] = status
            self._changed.set()
            self._changed = asyncio.Event()

    def set_all(self, serving: bool) -> None:
        for service in list(self._status):
            self.set(service, serving)

    def status(self, service: str) -> HealthCheckResponse.ServingStatus.ValueType:
        return self._status.get(service, SERVICE_UNKNOWN)

    async def check(
        self, request: HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
            raise AssertionError("abort() raises")  # for the type checker
        return HealthCheckResponse(status=status)

    async def watch(
        self, request: HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[HealthCheckResponse]:
        last = None
        while True:
            changed = self._changed
            status = self.status(request.service)
            if status != last:
                yield HealthCheckResponse(status=status)
                last = status
            await changed.wait()

    def register(self, server: grpc.aio.Server) -> None:
        handlers = {
            "Check": grpc.unary_unary_rpc_method_handler(
                self.check,
                request_deserializer=HealthCheckRequest.FromString,
                response_serializer=HealthCheckResponse.SerializeToString,
            ),
            "Watch": grpc.unary_stream_rpc_method_handler(
                self.watch,
                request_deserializer=HealthCheckRequest.FromString,
                response_serializer=HealthCheckResponse.SerializeToString,
            ),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
        )


async def admin_health(socket_path: str | os.PathLike[str], *, timeout: float = 2.0) -> bool:
    """Whether the admin socket answers the gRPC health check (overall) with SERVING.

    ``custos server healthcheck`` and the test rig ask this; anything else (no
    socket, refused, a gRPC error, no answer in *timeout* seconds) is False.
    """
    from grpclib.client import Channel
    from grpclib.exceptions import GRPCError, StreamTerminatedError
    from grpclib.health.v1.health_grpc import HealthStub

    channel = Channel(path=os.fspath(socket_path))
    try:
        reply = await asyncio.wait_for(
            HealthStub(channel).Check(HealthCheckRequest(service=OVERALL)), timeout
        )
    except (OSError, TimeoutError, GRPCError, StreamTerminatedError):
        return False
    finally:
        channel.close()
    return bool(reply.status == SERVING)


__all__ = [
    "NOT_SERVING",
    "OVERALL",
    "SERVICE_NAME",
    "SERVICE_UNKNOWN",
    "SERVING",
    "AgentApiHealth",
    "HealthCheckRequest",
    "HealthCheckResponse",
    "admin_health",
]
