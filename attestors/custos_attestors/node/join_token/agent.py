"""Agent half of ``join_token``: sends the configured secret once."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping

from custos.plugin.protocols import CoreConfig
from custos_attestors.node.join_token.wire import check_token, encode


class JoinTokenAgentAttestor:
    """Configured with ``{"token": "<secret>"}`` (SPIRE's ``join_token`` setting)."""

    def __init__(self) -> None:
        self._token: str | None = None

    def configure(self, config: Mapping[str, object], core: CoreConfig) -> None:
        unknown = set(config) - {"token"}
        if unknown:
            raise ValueError(f"unknown join_token settings: {', '.join(sorted(unknown))}")
        if "token" not in config:
            raise ValueError("join_token needs a 'token' setting")
        self._token = check_token(config["token"])

    async def attestation_flow(self) -> AsyncGenerator[bytes, bytes]:
        if self._token is None:
            raise RuntimeError("join_token is not configured")
        # A join token needs no challenge; the server decides on the payload alone.
        yield encode(self._token)

    def close(self) -> None:
        self._token = None
