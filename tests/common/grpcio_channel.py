"""A grpcio channel to the Agent API for tests that play a raw or hostile client.

The agent's own client is on grpclib (decision 0126); tests that send exactly the
messages they want (no client-side checks) keep grpcio, whose stream API makes that
easy, with the same trust and name checks as the agent's channel."""

from __future__ import annotations

import grpc
from cryptography.hazmat.primitives.serialization import Encoding
from grpclib.const import Status

from custos.agent.client.channel import MAX_MESSAGE_BYTES
from custos.bundle import TrustBundle


def grpcio_channel(address: str, *, bundle: TrustBundle, server_name: str) -> grpc.aio.Channel:
    roots = b"".join(c.public_bytes(Encoding.PEM) for c in bundle.x509_authorities)
    return grpc.aio.secure_channel(
        address,
        grpc.ssl_channel_credentials(root_certificates=roots),
        options=[
            ("grpc.ssl_target_name_override", server_name),
            ("grpc.default_authority", server_name),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )


def status_of(code: grpc.StatusCode) -> Status:
    """grpclib's status of the same name (what AgentApiError carries)."""
    return Status[code.name]
