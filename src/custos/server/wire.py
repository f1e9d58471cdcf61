"""Records ⇄ protobuf messages, for the Agent API and the admin API alike.

One place converts, so an entry or a bundle looks the same on every API. Times
are Unix seconds and TTLs whole seconds on the wire (``types_v1.proto``); an
``expires_at`` of 0 means "never".
"""

from __future__ import annotations

import math
from typing import Any

from custos._proto import admin_v1_pb2, types_v1_pb2
from custos.bundle import TrustBundle
from custos.identity import SpiffeId
from custos.server.datastore.records import Agent, RegistrationEntry, selector_tuple


def _whole_seconds(value: float) -> int:
    # Round up: a TTL of 0.5 s must not become 0 ("use the default") on the wire.
    return math.ceil(value)


def entry_to_proto(entry: RegistrationEntry) -> types_v1_pb2.Entry:
    return types_v1_pb2.Entry(
        id=entry.id,
        spiffe_id=str(entry.spiffe_id),
        parent_id=str(entry.parent_id),
        selectors=[str(s) for s in entry.selectors],
        x509_svid_ttl=_whole_seconds(entry.x509_svid_ttl),
        jwt_svid_ttl=_whole_seconds(entry.jwt_svid_ttl),
        wit_ttl=_whole_seconds(entry.wit_ttl),
        dns_names=list(entry.dns_names),
        key_custody=entry.key_custody,
        hint=entry.hint,
        admin=entry.admin,
        downstream=entry.downstream,
        expires_at=0 if entry.expires_at is None else _whole_seconds(entry.expires_at),
        revision=entry.revision,
        require_residency=entry.require_residency,
    )


def entry_fields_from_proto(message: types_v1_pb2.Entry) -> dict[str, Any]:
    """The keyword arguments of ``Datastore.entries.create`` from an ``Entry``
    message (no id, no revision). Nothing is validated here: the datastore
    validates every field before it writes. A TTL of 0 means "not given"
    (proto3 has no absent int) and is left for the caller to default."""
    return {
        "spiffe_id": message.spiffe_id,
        "parent_id": message.parent_id,
        "selectors": list(message.selectors),
        "x509_svid_ttl": float(message.x509_svid_ttl),
        "jwt_svid_ttl": float(message.jwt_svid_ttl),
        "wit_ttl": float(message.wit_ttl),
        "dns_names": list(message.dns_names),
        "key_custody": message.key_custody or "memory",
        "hint": message.hint,
        "admin": message.admin,
        "downstream": message.downstream,
        "expires_at": float(message.expires_at) if message.expires_at else None,
        "require_residency": message.require_residency,
    }


def entry_from_proto(message: types_v1_pb2.Entry) -> RegistrationEntry:
    """A whole :class:`RegistrationEntry` as a server sent it (the agent's side of
    ``SyncEntries``). IDs and selectors are parsed (a malformed one raises its
    custos error); ``change_seq`` is not on the wire and is 0."""
    fields = entry_fields_from_proto(message)
    return RegistrationEntry(
        id=message.id,
        spiffe_id=SpiffeId.parse(fields.pop("spiffe_id")),
        parent_id=SpiffeId.parse(fields.pop("parent_id")),
        selectors=selector_tuple(fields.pop("selectors"), required=False),
        dns_names=tuple(fields.pop("dns_names")),
        revision=message.revision,
        change_seq=0,
        **fields,
    )


def bundle_to_proto(bundle: TrustBundle, seq: int) -> types_v1_pb2.Bundle:
    """The SPIFFE bundle document of ``bundle`` with sequence number ``seq``."""
    stamped = bundle.with_sequence(seq)
    return types_v1_pb2.Bundle(
        trust_domain=str(stamped.trust_domain),
        spiffe_bundle=stamped.to_spiffe_json(),
        sequence_number=seq,
    )


def bundle_from_proto(message: types_v1_pb2.Bundle) -> TrustBundle:
    """The bundle a server sent (raises ``BundleError`` on a malformed document)."""
    return TrustBundle.from_spiffe_json(message.trust_domain, message.spiffe_bundle)


def agent_to_proto(agent: Agent) -> admin_v1_pb2.Agent:
    return admin_v1_pb2.Agent(
        id=str(agent.id),
        attestor=agent.attestor,
        selectors=[str(s) for s in agent.selectors],
        serial=agent.serial,
        expires_at=_whole_seconds(agent.expires_at),
        evicted=agent.evicted,
        banned=agent.banned,
        updated_at=int(agent.updated_at),
        attestation_key=agent.attestation_key,
    )
