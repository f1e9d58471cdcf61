"""Caps on what callers may hold open on the Agent API (decision 0056).

- :data:`MAX_CONCURRENT_STREAMS`: HTTP/2 streams per connection (grpc's
  ``grpc.max_concurrent_streams`` server option), so one connection cannot open
  calls without bound;
- :data:`MAX_PENDING_ATTESTATIONS`: ``AttestAgent`` calls in progress at once on
  one server. They come before any authentication, and each may wait up to the
  attestation deadline for its evidence: without a cap, idle callers could hold
  the server's memory and tasks. One more is RESOURCE_EXHAUSTED, which the agent
  retries with backoff (as it retries UNAVAILABLE).

The per-agent cap on push streams lives with the streams
(:data:`custos.server.agent_api.entries.MAX_STREAMS_PER_AGENT`).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from custos.server.agent_api.status import AgentApiBusyError, abort

#: HTTP/2 streams one connection may have open (an agent needs two push streams
#: plus its calls in flight).
MAX_CONCURRENT_STREAMS = 100
#: AttestAgent calls in progress at once on one server.
MAX_PENDING_ATTESTATIONS = 64
ATTEST_AGENT_METHOD = "/custos.agent.v1.Attestation/AttestAgent"


class AttestationCapInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses an ``AttestAgent`` call past :data:`MAX_PENDING_ATTESTATIONS` in progress
    (RESOURCE_EXHAUSTED, ``too_many_attestations``); other methods pass untouched."""

    def __init__(self, limit: int = MAX_PENDING_ATTESTATIONS) -> None:
        self._limit = limit
        self._pending = 0  # the event loop's thread only: no lock

    @property
    def pending(self) -> int:
        return self._pending

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if (
            handler is None
            or handler_call_details.method != ATTEST_AGENT_METHOD
            or handler.stream_stream is None
            or not inspect.iscoroutinefunction(handler.stream_stream)
        ):
            return handler
        return grpc.stream_stream_rpc_method_handler(
            self._capped(handler.stream_stream),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _capped(self, behaviour: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def capped(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if self._pending >= self._limit:
                await abort(
                    context,
                    AgentApiBusyError(
                        f"the server has {self._limit} attestations in progress; try again",
                        code="too_many_attestations",
                    ),
                )
            self._pending += 1
            try:
                return await behaviour(requests, context)
            finally:
                self._pending -= 1

        return capped


__all__ = [
    "ATTEST_AGENT_METHOD",
    "MAX_CONCURRENT_STREAMS",
    "MAX_PENDING_ATTESTATIONS",
    "AttestationCapInterceptor",
]
