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
"""

from __future__ import annotations

import time

from custos.identity import SpiffeId
from custos.server.datastore.records import Agent, RegistrationEntry
from custos.server.datastore.store import Datastore

#: Levels below the agent (or an alias) the walk follows; SPIRE nests entries a
#: few levels deep (agent → node group → workload), never sixteen.
MAX_DEPTH = 16


def alias_ids(datastore: Datastore, agent: Agent, server_id: SpiffeId) -> list[SpiffeId]:
    """The node alias IDs of ``agent``: entries under the server whose selectors
    are all among the agent's node selectors (unexpired ones only)."""
    if not agent.selectors:
        return []
    now = time.time()
    return [
        e.spiffe_id
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
    if agent.evicted or agent.banned:
        return []
    now = time.time()
    frontier = {agent.id, *alias_ids(datastore, agent, server_id)}
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
    return [found[k] for k in sorted(found)]


def _expired(entry: RegistrationEntry, now: float) -> bool:
    return entry.expires_at is not None and entry.expires_at <= now
