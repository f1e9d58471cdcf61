"""Server half of ``join_token``: consumes the secret through the datastore.

The server hands the plugin its :class:`~custos.server.datastore.Datastore` in the
configuration table under ``"datastore"`` (see docs/attestors.md, "join_token").
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Mapping

from custos.errors import CustosError
from custos.identity.ids import SpiffeId
from custos.plugin.protocols import AttestedNode, Challenge, CoreConfig
from custos.server.datastore import Datastore
from custos.server.datastore.errors import NotFoundError
from custos_attestors.node.join_token.wire import decode

NAME = "join_token"


class JoinTokenBannedError(CustosError):
    """The agent named after this token is banned."""

    code = "agent_banned"


class JoinTokenServerAttestor:
    def __init__(self) -> None:
        self._store: Datastore | None = None
        self._core: CoreConfig | None = None

    @property
    def supports_reattestation(self) -> bool:
        # The token is spent by the first attestation; renewal goes through the
        # WIT-authenticated call, as in SPIRE.
        return False

    def configure(self, config: Mapping[str, object], core: CoreConfig) -> None:
        unknown = set(config) - {"datastore"}
        if unknown:
            raise ValueError(f"unknown join_token settings: {', '.join(sorted(unknown))}")
        store = config.get("datastore")
        if not isinstance(store, Datastore):
            raise ValueError("join_token needs the server's Datastore as 'datastore'")
        if store.trust_domain != core.trust_domain:
            raise ValueError("the datastore serves another trust domain")
        self._store = store
        self._core = core

    async def attest(self, payload: bytes) -> AsyncGenerator[Challenge | AttestedNode, bytes]:
        if self._store is None or self._core is None:
            raise RuntimeError("join_token is not configured")
        store, core = self._store, self._core
        secret = decode(payload)
        # The datastore is synchronous; a thread keeps the event loop free, and the
        # consume itself is one conditional UPDATE, so concurrent callers race safely.
        token = await asyncio.to_thread(store.join_tokens.consume, secret)
        agent_id = SpiffeId(core.trust_domain, f"/custos/agent/{NAME}/{token.id}")
        try:
            agent = await asyncio.to_thread(store.agents.get, agent_id)
        except NotFoundError:
            agent = None
        if agent is not None and agent.banned:
            raise JoinTokenBannedError(f"agent {agent_id} is banned")
        # SPIRE's join_token gives no selectors: the agent ID is the only fact.
        yield AttestedNode(agent_path=[token.id])

    def close(self) -> None:
        self._store = None
        self._core = None
