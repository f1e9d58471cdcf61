"""The ``custos.agent.v1.Attestation`` service: ``AttestAgent`` and ``RenewAgent``.

A thin gRPC adapter over :class:`custos.server.attestation.NodeAttestation`: it reads
and writes the stream, turns the result into the wire's ``AgentIdentity``, and hands
every refusal to :func:`custos.server.agent_api.status.abort` (the one place that
chooses gRPC statuses).  ``AttestAgent`` is the one unauthenticated call of the Agent
API; ``RenewAgent`` is authenticated like every other (agent WIT + WPT).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError

from custos._proto import agent_v1_pb2, agent_v1_pb2_grpc
from custos.server.agent_api.auth import authenticate
from custos.server.agent_api.status import abort
from custos.server.attestation import (
    AttestationProtocolError,
    AttestedAgent,
    NodeAttestation,
)
from custos.server.wire import bundle_to_proto

if TYPE_CHECKING:
    from custos.server.context import ServerContext

SERVICE = "custos.agent.v1.Attestation"
#: After the result, at most this long (and never past the call's deadline) for the
#: agent's half-close (decision 0126).
HALF_CLOSE_WAIT = 5.0


class _Stream:
    """One call's reader/writer as :class:`custos.server.attestation.AttestationStream`."""

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._context = context

    async def receive(self) -> agent_v1_pb2.AttestAgentRequest | None:
        try:
            message = await self._context.read()
        except DecodeError as e:
            # grpcio deserializes inside read(): bytes that are not protobuf land here.
            raise AttestationProtocolError("a message is not an AttestAgentRequest") from e
        if message is grpc.aio.EOF:
            return None
        assert isinstance(message, agent_v1_pb2.AttestAgentRequest)
        return message

    async def send_challenge(self, data: bytes) -> None:
        await self._context.write(agent_v1_pb2.AttestAgentResponse(challenge=data))


def identity_to_proto(attested: AttestedAgent, bundle_seq: int) -> agent_v1_pb2.AgentIdentity:
    credentials = attested.credentials
    return agent_v1_pb2.AgentIdentity(
        spiffe_id=str(attested.agent_id),
        x509_svid=credentials.x509_svid.to_der_chain(),
        wit=credentials.wit,
        bundle=bundle_to_proto(attested.bundle, bundle_seq),
        selectors=[str(s) for s in attested.selectors],
        expires_at=int(credentials.not_after),
        reattestable=attested.reattestable,
    )


class AttestationServicer(agent_v1_pb2_grpc.AttestationServicer):
    def __init__(self, ctx: ServerContext, attestation: NodeAttestation | None = None) -> None:
        self._ctx = ctx
        self._attestation = attestation or NodeAttestation(ctx)

    async def AttestAgent(
        self, request_iterator: object, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        # The reader/writer API (context.read/write), not the iterator: challenges are
        # written from inside the attestor's flow, between two reads.
        try:
            attested = await self._attestation.run(_Stream(context))
        except Exception as e:  # noqa: BLE001 - every refusal and fault leaves through abort()
            await abort(context, e)
        seq = self._ctx.events.bundle_generation
        await context.write(
            agent_v1_pb2.AttestAgentResponse(result=identity_to_proto(attested, seq))
        )
        await _half_close(context)

    async def RenewAgent(
        self,
        request: agent_v1_pb2.RenewAgentRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> agent_v1_pb2.AgentIdentity:
        agent = await authenticate(context, self._ctx, SERVICE, "RenewAgent")
        try:
            attested = await self._attestation.renew(agent, request.key)
        except Exception as e:  # noqa: BLE001 - every refusal and fault leaves through abort()
            await abort(context, e)
        return identity_to_proto(attested, self._ctx.events.bundle_generation)


async def _half_close(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Wait for the agent to half-close before ending the call (bounded).

    An HTTP/2 server that ends a stream its client has not half-closed resets it
    (RST_STREAM NO_ERROR), and the agent's client, grpclib, then drops the result it
    has received but not yet handed out (grpclib #52): the join token would be spent
    for nothing.  The agent half-closes once it has read the result; an agent that
    does not (an older one cancels) ends the wait, as does the deadline."""
    remaining = context.time_remaining()
    wait = HALF_CLOSE_WAIT if remaining is None else max(0.0, min(HALF_CLOSE_WAIT, remaining))
    with contextlib.suppress(Exception):
        async with asyncio.timeout(wait):
            await context.read()  # EOF (the half-close) or a stray message: done either way


def register(server: grpc.aio.Server, ctx: ServerContext) -> None:
    """Serve ``custos.agent.v1.Attestation`` on ``server``."""
    agent_v1_pb2_grpc.add_AttestationServicer_to_server(  # type: ignore[no-untyped-call]
        AttestationServicer(ctx), server
    )


__all__ = ["SERVICE", "AttestationServicer", "identity_to_proto", "register"]
