"""What the asyncio and the blocking client share: address, deadlines, channel
options, the retry rule and the translation of gRPC errors (decision 0052)."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Any, TypeVar

import grpc

from custos._numbers import InvalidNumberError, seconds
from custos.client._ops import SPIFFE_METADATA, Op
from custos.client.address import Endpoint, endpoint_from_env
from custos.client.errors import InvalidRequestError, WorkloadApiError, error_from_status
from custos.identity import SpiffeId

T = TypeVar("T")
Timeout = float | timedelta | None
#: Which of the caller's identities (None: its default one).
Id = str | SpiffeId | None

#: Per-call deadline unless a call or the client says otherwise.
DEFAULT_TIMEOUT = 10.0
#: A local socket: reconnect quickly after the agent restarts (gRPC's default
#: backoff starts at 1 s and grows to 2 min, made for remote servers).
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # A Unix socket is never reached through an HTTP proxy from the environment.
    ("grpc.enable_http_proxy", 0),
]


def _timeout(value: float | timedelta, name: str) -> float:
    try:
        return seconds(value, name=name, minimum=0.001, maximum=3600.0)
    except InvalidNumberError as e:
        raise InvalidRequestError(e.message) from e


class ClientBase:
    """``socket``: ``unix:///path``, ``unix:path``, a path, or None for
    ``SPIFFE_ENDPOINT_SOCKET``. ``timeout``: each call's deadline (a call may
    pass its own). ``wait_for_ready``: a call made while the agent is away (not
    started yet, restarting) waits for it until its deadline instead of failing
    at once; a call whose connection drops midway is sent once more within its
    deadline (every call is safe to repeat: none changes anything in the agent)."""

    def __init__(
        self,
        socket: str | os.PathLike[str] | None = None,
        *,
        timeout: float | timedelta = DEFAULT_TIMEOUT,
        wait_for_ready: bool = True,
    ) -> None:
        self.endpoint: Endpoint = endpoint_from_env(socket)
        self.timeout = _timeout(timeout, "timeout")
        self.wait_for_ready = bool(wait_for_ready)

    def _deadline(self, timeout: float | timedelta | None) -> float:
        """The monotonic time the call must end by."""
        given = self.timeout if timeout is None else _timeout(timeout, "timeout")
        return time.monotonic() + given

    def _options(self, op: Op[Any], deadline: float) -> dict[str, Any]:
        return {
            "timeout": max(deadline - time.monotonic(), 0.001),
            "metadata": SPIFFE_METADATA if op.spiffe else None,
            "wait_for_ready": self.wait_for_ready,
        }

    def _again(self, error: grpc.RpcError, attempt: int, deadline: float) -> bool:
        """Whether a failed attempt is tried once more (a dropped connection)."""
        return (
            self.wait_for_ready
            and attempt == 0
            and _status(error) is grpc.StatusCode.UNAVAILABLE
            and deadline - time.monotonic() > 0.01
        )

    def _error(self, error: grpc.RpcError) -> WorkloadApiError:
        details = error.details() if isinstance(error, grpc.Call | grpc.aio.AioRpcError) else ""
        return error_from_status(_status(error), details or "", self.endpoint.uri)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.endpoint.uri!r})"


def _status(error: grpc.RpcError) -> grpc.StatusCode:
    if isinstance(error, grpc.Call | grpc.aio.AioRpcError):
        code = error.code()
        if isinstance(code, grpc.StatusCode):
            return code
    return grpc.StatusCode.UNKNOWN


def serializer(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data


def method(channel: grpc.Channel | grpc.aio.Channel, op: Op[Any]) -> Any:
    """The channel's multi-callable for ``op`` (blocking and aio channels alike)."""
    make = channel.unary_stream if op.stream else channel.unary_unary
    return make(op.path, request_serializer=serializer,
                response_deserializer=op.reply.FromString)


__all__ = ["CHANNEL_OPTIONS", "DEFAULT_TIMEOUT", "ClientBase", "Id", "T", "Timeout", "method"]
