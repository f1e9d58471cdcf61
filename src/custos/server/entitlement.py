"""Which registration entries an agent may get (issue 8; decision 0036).

SPIRE's rule: the entries reachable from the agent's SPIFFE ID and from its
node alias IDs by following ``parent_id`` edges downwards.  An alias ID is the
``spiffe_id`` of an entry parented to the server (``ctx.server_id``) whose
selectors are all among the agent's node selectors; the alias entries
themselves are not sent (they name a group of nodes, not a workload).  A join
token's ``--spiffe-id X`` entry is parented to the agent directly
(``parent_id=<agent id>``, selector ``spiffe_id:<agent id>``), so it and the
entries under X are reached by the same walk.

The walk queries one whole level of the tree at a time
(:meth:`EntryRepository.list_by_parents`), so an agent that owns 1,000 of
10,000 entries costs a few queries, not one per entry; each level's query also
says which of its entries have children, and the walk stops where none do.  It is cycle-safe (a
parent is expanded once), stops at :data:`MAX_DEPTH` levels, and leaves
expired entries out: their children are not reached through them either, as
once the datastore prunes them.

:class:`Entitlement` remembers each agent's walk until the datastore's entry change
feed moves or the first entry on it expires (decision 0127): every call still reads
the feed's position (one indexed ``max``), so a change made through any server is seen
by the very next call, as without it.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from custos.identity import SpiffeId
from custos.server.datastore.records import Agent, RegistrationEntry
from custos.server.datastore.store import Datastore

#: Levels below the agent (or an alias) the walk follows; SPIRE nests entries a
#: few levels deep (agent → node group → workload), never sixteen.
MAX_DEPTH = 16


#: Agents whose walk :class:`Entitlement` keeps (least recently used go first): a
#: server's agents, with room to spare; an agent past it is walked on every call.
MAX_REMEMBERED_AGENTS = 4096


def alias_ids(datastore: Datastore, agent: Agent, server_id: SpiffeId) -> list[SpiffeId]:
    """The node alias IDs of ``agent``: entries under the server whose selectors
    are all among the agent's node selectors (unexpired ones only)."""
    return [e.spiffe_id for e in _aliases(datastore, agent, server_id, time.time())]


def _aliases(
    datastore: Datastore, agent: Agent, server_id: SpiffeId, now: float
) -> list[RegistrationEntry]:
    if not agent.selectors:
        return []
    return [
        e
        for e in datastore.entries.list(
            parent_id=server_id, selectors=agent.selectors, match="subset"
        )
        if not _expired(e, now)
    ]


def entries_for_agent(
    datastore: Datastore, agent: Agent, server_id: SpiffeId
) -> list[RegistrationEntry]:
    """The entries ``agent`` may get SVIDs for, sorted by entry id.

    An evicted or banned agent gets none: its credentials are no longer good
    for anything, whatever the caller checked before.
    """
    return _walk(datastore, agent, server_id)[0]


def _walk(
    datastore: Datastore, agent: Agent, server_id: SpiffeId
) -> tuple[list[RegistrationEntry], float]:
    """:func:`entries_for_agent`, and until when its answer stands without a change
    to the entries: the earliest expiry among the entries it walked (aliases too)."""
    if agent.evicted or agent.banned:
        return [], float("inf")
    now = time.time()
    aliases = _aliases(datastore, agent, server_id, now)
    frontier = {agent.id, *(e.spiffe_id for e in aliases)}
    # The server's own ID is never a parent to walk from: its children are the
    # alias entries, which every agent would otherwise get.
    expanded = {server_id}
    found: dict[str, RegistrationEntry] = {}
    for _ in range(MAX_DEPTH):
        frontier -= expanded
        if not frontier:
            break
        expanded |= frontier
        level = datastore.entries.list_by_parents(frontier)
        children = [e for e in level.entries if not _expired(e, now)]
        for entry in children:
            found.setdefault(entry.id, entry)
        # Only a child that is some entry's parent has a level below it to ask for.
        frontier = {e.spiffe_id for e in children if e.spiffe_id in level.parents}
    ends = [e.expires_at for e in (*aliases, *found.values()) if e.expires_at is not None]
    return [found[k] for k in sorted(found)], min(ends, default=float("inf"))


@dataclass(frozen=True)
class _Walked:
    feed_seq: int
    valid_until: float
    entries: tuple[RegistrationEntry, ...]


class Entitlement:
    """:func:`entries_for_agent` for the issuer, remembered per agent (its ID and node
    selectors) while nothing it depends on moved (decision 0127).

    Each call reads the entry change feed's position first (every entry create,
    update and delete adds to it in its own transaction, on every server) and walks
    again when it moved since the remembered walk, or when the walk's earliest entry
    expiry has passed. Reading the position before the walk means a change that
    commits during the walk makes the next call walk again, never the reverse.
    Evicted and banned agents are answered before anything is remembered.
    """

    def __init__(
        self, datastore: Datastore, server_id: SpiffeId, *, max_agents: int = MAX_REMEMBERED_AGENTS
    ) -> None:
        self._datastore = datastore
        self._server_id = server_id
        self._max_agents = max_agents
        self._walked: OrderedDict[tuple[SpiffeId, tuple[object, ...]], _Walked] = OrderedDict()
        self._lock = threading.Lock()  # worker threads of the Agent API share it

    def __call__(self, agent: Agent) -> list[RegistrationEntry]:
        if agent.evicted or agent.banned:
            return []
        seq = self._datastore.entries.last_change_seq()
        key = (agent.id, tuple(agent.selectors))
        with self._lock:
            walked = self._walked.get(key)
            if walked is not None and walked.feed_seq == seq and time.time() < walked.valid_until:
                self._walked.move_to_end(key)
                return list(walked.entries)
        entries, valid_until = _walk(self._datastore, agent, self._server_id)
        with self._lock:
            self._walked[key] = _Walked(seq, valid_until, tuple(entries))
            self._walked.move_to_end(key)
            while len(self._walked) > self._max_agents:
                self._walked.popitem(last=False)
        return entries


def _expired(entry: RegistrationEntry, now: float) -> bool:
    return entry.expires_at is not None and entry.expires_at <= now
