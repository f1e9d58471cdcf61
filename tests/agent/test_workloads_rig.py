"""What the workload-credential tests share: a real server in the test's loop, an agent
attested with a join token through the client library (``custos.testing.server``),
and :class:`RigNode`, the :class:`~custos.agent.identities.NodeLink` over that agent
(the agent's own identity is NODE's part; these tests need only its client and bundle).

Every wait is bounded: a missing update fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from custos._proto import types_v1_pb2
from custos.agent.client.calls import AgentApiClient
from custos.agent.client.errors import AgentApiError
from custos.agent.identities import ChangeCounter, WorkloadIdentity
from custos.bundle import TrustBundle
from custos.errors import CustosError
from custos.keys import KeyInfo, MemoryKeyStore
from custos.testing.server import RigAgent

TD = "example.org"
BOUND = 30.0
T = TypeVar("T")


class RigNode:
    """The agent's identity as the workload side sees it: a fixed client and bundle."""

    def __init__(self, agent: RigAgent, client: AgentApiClient | None = None) -> None:
        self.agent = agent
        self._client = client or agent.client
        self.refusals: list[AgentApiError] = []
        self.changes = ChangeCounter()
        self._bundle: TrustBundle | None = None

    #: True: the node has lost its identity (``client`` raises, as NodeIdentity's does).
    lost = False

    @property
    def client(self) -> AgentApiClient:
        if self.lost:
            raise CustosError("the agent has no identity", code="node_identity")
        return self._client

    @property
    def bundle(self) -> TrustBundle:
        return self._bundle or self.agent.identity.bundle

    @property
    def generation(self) -> int:
        return self.changes.value

    async def wait_changed(self, seen: int) -> int:
        return await self.changes.wait_changed(seen)

    def report_refused(self, error: AgentApiError) -> None:
        self.refusals.append(error)

    def replace(
        self, *, client: AgentApiClient | None = None, bundle: TrustBundle | None = None
    ) -> None:
        """What a renewal or a bundle update does: new values, the generation moves."""
        self._client = client or self._client
        self._bundle = bundle or self._bundle
        self.changes.bump()


class Clock:
    """Real time plus an offset the test moves (the manager's injected clock)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class RecordingMemoryStore(MemoryKeyStore):
    """A real memory store that also notes when each key was deleted (by the clock
    the manager uses), so a test can compare it with the credentials' expiry."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__()
        self.clock = clock
        self.deleted: dict[str, float] = {}
        self.created: list[str] = []

    def _create(self, name: str, alg: Any) -> KeyInfo:
        info = super()._create(name, alg)
        self.created.append(name)
        return info

    def _delete(self, name: str) -> None:
        super()._delete(name)
        self.deleted[name] = self.clock()


def entry(spiffe_id: str, parent: str, *selectors: str, **fields: Any) -> types_v1_pb2.Entry:
    return types_v1_pb2.Entry(
        spiffe_id=f"spiffe://{TD}{spiffe_id}",
        parent_id=parent,
        selectors=list(selectors or ["unix:uid:1000"]),
        **fields,
    )


async def bounded(aw: Awaitable[T], timeout: float = BOUND) -> T:
    return await asyncio.wait_for(aw, timeout)


async def until(check: Callable[[], T | None], wake: Callable[[], None] | None = None) -> T:
    """Poll ``check`` (every 20 ms, at most BOUND seconds) until it returns a truthy value."""

    async def poll() -> T:
        while True:
            value = check()
            if value:
                return value
            if wake is not None:
                wake()
            await asyncio.sleep(0.02)

    return await bounded(poll())


def by_entry(identities: list[WorkloadIdentity], entry_id: str) -> WorkloadIdentity | None:
    return next((i for i in identities if i.entry_id == entry_id), None)
