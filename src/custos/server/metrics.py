"""The server's Prometheus metrics (served at ``/metrics``; docs/operations.md).

Each :class:`ServerMetrics` has its own ``CollectorRegistry``: tests run several
servers in one process, and a process-global registry would refuse the second.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextvars import ContextVar
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

#: Set while an Agent API call runs when it was ended because the datastore or the
#: replay cache was unreachable. ``status.abort`` (the one exit of every refused call)
#: sets it; the interceptor below, which knows the method and the metrics, counts it
#: once. A context variable: each gRPC call runs in its own task.
_store_unavailable: ContextVar[bool] = ContextVar("custos_store_unavailable", default=False)


def note_store_unavailable() -> None:
    """Mark the running Agent API call as ended by an unreachable datastore or replay
    cache (counted in ``custos_server_datastore_errors{operation=<method>}``)."""
    _store_unavailable.set(True)


class ServerMetrics:
    """Every metric the server exports, created once per server."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        #: Credentials issued, by kind: x509-svid | wit | jwt-svid | agent-x509-svid | agent-wit.
        self.issued = Counter(
            "custos_server_issued", "Credentials issued", ["kind"], registry=self.registry
        )
        #: Issuance requests refused, by kind and custos error code.
        self.refused = Counter(
            "custos_server_refused",
            "Issuance requests refused",
            ["kind", "code"],
            registry=self.registry,
        )
        #: Node attestations, by attestor and outcome: ok | refused | error.
        self.attestations = Counter(
            "custos_server_attestations",
            "Node attestation outcomes",
            ["attestor", "outcome"],
            registry=self.registry,
        )
        #: Agent API and admin API call latency, by gRPC method path and status code.
        self.call_seconds = Histogram(
            "custos_server_call_seconds",
            "Agent API and admin API call latency",
            ["method", "code"],
            registry=self.registry,
        )
        #: Datastore operations that failed (database unreachable, timeouts).
        self.datastore_errors = Counter(
            "custos_server_datastore_errors",
            "Datastore operations that failed",
            ["operation"],
            registry=self.registry,
        )
        #: Entry-set updates sent to connected agents.
        self.entry_updates = Counter(
            "custos_server_entry_updates",
            "Entry-set updates sent to agents",
            registry=self.registry,
        )


class CallMetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Observes ``call_seconds{method, code}`` for every Agent API call.

    Wraps each handler's behaviour: the status is what the servicer set (``abort``
    sets it), ``OK`` when it returned normally, ``UNKNOWN`` for an exception that
    escaped, ``CANCELLED`` when the client went away.
    """

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        observe = self._observer(handler_call_details.method)
        for kind, make, wrap in _HANDLER_KINDS:
            behaviour = getattr(handler, kind)
            if behaviour is not None:
                return make(
                    wrap(behaviour, observe),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler

    def _observer(self, method: str) -> Callable[[Any, float, str], None]:
        def observe(context: Any, started: float, fallback: str) -> None:
            code = context.code()
            name = code.name if isinstance(code, grpc.StatusCode) else fallback
            self._metrics.call_seconds.labels(method, name).observe(time.perf_counter() - started)
            if _store_unavailable.get():
                self._metrics.datastore_errors.labels(method).inc()

        return observe


@contextlib.contextmanager
def _timing(context: Any, observe: Callable[[Any, float, str], None]) -> Iterator[None]:
    """Observe the block's duration under the call's final status."""
    started, fallback = time.perf_counter(), "OK"
    unset = _store_unavailable.set(False)
    try:
        yield
    except (asyncio.CancelledError, GeneratorExit):
        fallback = "CANCELLED"
        raise
    except BaseException:
        fallback = "UNKNOWN"
        raise
    finally:
        observe(context, started, fallback)
        _store_unavailable.reset(unset)


def _timed_call(
    behaviour: Callable[..., Any], observe: Callable[[Any, float, str], None]
) -> Callable[..., Any]:
    if not inspect.iscoroutinefunction(behaviour):
        return behaviour  # a synchronous handler: none on this server

    async def timed(request: Any, context: Any) -> Any:
        with _timing(context, observe):
            return await behaviour(request, context)

    return timed


def _timed_stream(
    behaviour: Callable[..., Any], observe: Callable[[Any, float, str], None]
) -> Callable[..., Any]:
    if not inspect.isasyncgenfunction(behaviour):
        return _timed_call(behaviour, observe)

    async def timed_gen(request: Any, context: Any) -> AsyncIterator[Any]:
        with _timing(context, observe):
            async for item in behaviour(request, context):
                yield item

    return timed_gen


#: (handler attribute, handler factory, wrapper) for the four kinds of gRPC method.
_HANDLER_KINDS: tuple[tuple[str, Callable[..., Any], Callable[..., Any]], ...] = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler, _timed_call),
    ("stream_unary", grpc.stream_unary_rpc_method_handler, _timed_call),
    ("unary_stream", grpc.unary_stream_rpc_method_handler, _timed_stream),
    ("stream_stream", grpc.stream_stream_rpc_method_handler, _timed_stream),
)
