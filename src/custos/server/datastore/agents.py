"""Attested node agents: record on attestation, list, show, evict, ban.

Evicting marks the agent so its next attestation must start again (SPIRE's
``agent evict``); a new attestation clears the mark, a renewal never does
(:meth:`AgentRepository.renewed` refuses an evicted agent). A banned agent stays
banned: :meth:`AgentRepository.attested` refuses it.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import time
from collections.abc import Iterable

from sqlalchemy import Engine, Row, insert, select, update

from custos._numbers import finite_number
from custos.identity import Selector, SpiffeId, TrustDomain
from custos.server.datastore.database import transaction
from custos.server.datastore.errors import DatastoreError, InvalidEntryError, NotFoundError
from custos.server.datastore.records import Agent, member_id, selector_tuple
from custos.server.datastore.schema import agents

#: Longest attestation key stored: a TPM2B_PUBLIC is a few hundred bytes (an ECC P-256
#: AK about 90, RSA 2048 about 280).
MAX_ATTESTATION_KEY = 2048


def _short(value: object, name: str, limit: int) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise InvalidEntryError(
            f"{name} must be a string of 1 to {limit} characters", code=f"invalid_{name}"
        )
    return value


class AgentRepository:
    def __init__(self, engine: Engine, trust_domain: TrustDomain) -> None:
        self._engine = engine
        self._trust_domain = trust_domain

    def attested(
        self,
        agent_id: SpiffeId | str,
        *,
        attestor: str,
        selectors: Iterable[Selector | str],
        serial: str,
        expires_at: float,
        attestation_key: bytes = b"",
        now: float | None = None,
    ) -> Agent:
        """Record a (re-)attestation: create the agent or refresh it, clearing ``evicted``.

        ``attestation_key`` (the TPM2B_PUBLIC of the AK the node's TPM activated, b""
        when none) replaces the stored one: the latest attestation says which AK
        proves this node's key residency (decision 0063).
        """
        if not isinstance(attestation_key, bytes) or len(attestation_key) > MAX_ATTESTATION_KEY:
            raise InvalidEntryError(
                f"attestation_key must be bytes, at most {MAX_ATTESTATION_KEY}",
                code="invalid_attestation_key",
            )
        agent = Agent(
            id=member_id(agent_id, self._trust_domain, "agent_id"),
            attestor=_short(attestor, "attestor", 256),
            selectors=selector_tuple(selectors, required=False),
            serial=_short(serial, "serial", 128),
            expires_at=finite_number(expires_at, name="expires_at", minimum=0),
            evicted=False,
            banned=False,
            updated_at=time.time() if now is None else finite_number(now, name="now"),
            attestation_key=attestation_key,
        )
        values = {
            "attestor": agent.attestor,
            "selectors": json.dumps([str(s) for s in agent.selectors]),
            "serial": agent.serial,
            "expires_at": agent.expires_at,
            "evicted": False,
            "updated_at": agent.updated_at,
            "attestation_key": attestation_key or None,
        }
        with transaction(self._engine) as conn:
            row = conn.execute(
                select(agents.c.banned).where(agents.c.id == str(agent.id)).with_for_update()
            ).first()
            if row is None:
                conn.execute(insert(agents).values(id=str(agent.id), banned=False, **values))
            elif row.banned:
                raise DatastoreError(f"agent {agent.id} is banned", code="agent_banned")
            else:
                conn.execute(update(agents).where(agents.c.id == str(agent.id)).values(values))
        return agent

    def renewed(
        self,
        agent_id: SpiffeId | str,
        *,
        serial: str,
        expires_at: float,
        now: float | None = None,
    ) -> Agent:
        """Record a renewal (``RenewAgent``): the new serial and expiry of an agent that
        is attested, not evicted and not banned; attestor and selectors stay.

        Checked and written in one ``FOR UPDATE`` transaction, and ``evicted`` is never
        written: an operator's eviction that lands while the renewal's credentials are
        being issued is kept and refuses the renewal (``agent_evicted``; a banned agent
        ``agent_banned``; an agent never attested ``agent_evicted`` too: attest first).
        """
        key = str(agent_id)[:2048]
        new_serial = _short(serial, "serial", 128)
        new_expiry = finite_number(expires_at, name="expires_at", minimum=0)
        at = time.time() if now is None else finite_number(now, name="now")
        with transaction(self._engine) as conn:
            row = conn.execute(select(agents).where(agents.c.id == key).with_for_update()).first()
            if row is not None and row.banned:
                raise DatastoreError(f"agent {key[:120]} is banned", code="agent_banned")
            if row is None or row.evicted:
                raise DatastoreError(
                    f"agent {key[:120]} is not attested (evicted?); it must attest again",
                    code="agent_evicted",
                )
            conn.execute(
                update(agents)
                .where(agents.c.id == key)
                .values(serial=new_serial, expires_at=new_expiry, updated_at=at)
            )
        return dataclasses.replace(
            _agent(row), serial=new_serial, expires_at=new_expiry, updated_at=at
        )

    def get(self, agent_id: SpiffeId | str) -> Agent:
        with transaction(self._engine, read_only=True) as conn:
            row = conn.execute(select(agents).where(agents.c.id == str(agent_id)[:2048])).first()
        if row is None:
            raise NotFoundError(f"no agent {str(agent_id)[:120]!r}", code="agent_not_found")
        return _agent(row)

    def list(self) -> builtins.list[Agent]:
        with transaction(self._engine, read_only=True) as conn:
            return [_agent(r) for r in conn.execute(select(agents).order_by(agents.c.id)).all()]

    def evict(self, agent_id: SpiffeId | str, *, now: float | None = None) -> Agent:
        """Evict the agent (``updated_at`` = ``now``, default the clock)."""
        return self._flag(agent_id, now, evicted=True)

    def ban(self, agent_id: SpiffeId | str, *, now: float | None = None) -> Agent:
        """Ban (and evict) the agent: it cannot attest again under this ID."""
        return self._flag(agent_id, now, evicted=True, banned=True)

    def _flag(self, agent_id: SpiffeId | str, now: float | None, **flags: bool) -> Agent:
        # An operator's evict/ban is a change of the agent like an attestation: the
        # listing's updated_at says when it happened.
        at = time.time() if now is None else finite_number(now, name="now")
        with transaction(self._engine) as conn:
            changed = conn.execute(
                update(agents)
                .where(agents.c.id == str(agent_id)[:2048])
                .values(updated_at=at, **flags)
            ).rowcount
        if changed != 1:
            raise NotFoundError(f"no agent {str(agent_id)[:120]!r}", code="agent_not_found")
        return self.get(agent_id)


def _agent(row: Row[object]) -> Agent:
    return Agent(
        id=SpiffeId.parse(row.id),
        attestor=row.attestor,
        selectors=tuple(Selector.parse(s) for s in json.loads(row.selectors)),
        serial=row.serial,
        expires_at=row.expires_at,
        evicted=bool(row.evicted),
        banned=bool(row.banned),
        updated_at=row.updated_at,
        attestation_key=bytes(row.attestation_key or b""),
    )
