"""Registration entries: create / get / list / update (optimistic) / delete /
count, and the change feed every write appends to."""

from __future__ import annotations

import builtins
import functools
import json
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Literal, NamedTuple

from sqlalchemy import (
    Connection,
    Engine,
    RowMapping,
    and_,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError

from custos.identity import Selector, SpiffeId, TrustDomain
from custos.server.datastore import records
from custos.server.datastore.database import inserted_key, transaction
from custos.server.datastore.errors import (
    EntryExistsError,
    InvalidEntryError,
    NotFoundError,
    RevisionConflictError,
)
from custos.server.datastore.records import EntryChange, RegistrationEntry
from custos.server.datastore.schema import entries, entry_changes, entry_selectors

#: How ``list(selectors=...)`` compares an entry's selectors S with the given G
#: (SPIRE's match modes): exact S == G, subset S <= G (the entries a workload
#: with selectors G gets), superset S >= G, any: S and G share one.
SelectorMatch = Literal["exact", "subset", "superset", "any"]
_MATCHES = ("exact", "subset", "superset", "any")
#: Parents per query in :meth:`EntryRepository.list_by_parents`: well under
#: SQLite's and PostgreSQL's bound-parameter limits.
PARENT_BATCH = 500


class EntryLevel(NamedTuple):
    """One level of the entry tree (:meth:`EntryRepository.list_by_parents`): the
    entries, and those of their SPIFFE IDs that are some entry's parent in turn."""

    entries: list[RegistrationEntry]
    parents: frozenset[SpiffeId]


class EntryRepository:
    def __init__(self, engine: Engine, trust_domain: TrustDomain) -> None:
        self._engine = engine
        self._trust_domain = trust_domain

    def create(
        self,
        spiffe_id: SpiffeId | str,
        parent_id: SpiffeId | str,
        selectors: Iterable[Selector | str],
        *,
        x509_svid_ttl: float = 3600.0,
        jwt_svid_ttl: float = 300.0,
        wit_ttl: float = 300.0,
        dns_names: Sequence[str] = (),
        key_custody: str = "memory",
        hint: str = "",
        admin: bool = False,
        downstream: bool = False,
        expires_at: float | None = None,
        require_residency: bool = False,
    ) -> RegistrationEntry:
        """Validate and store a new entry (revision 1); nothing is written on error."""
        draft = RegistrationEntry(
            id=uuid.uuid4().hex,
            spiffe_id=spiffe_id,  # type: ignore[arg-type]  # validate_entry coerces
            parent_id=parent_id,  # type: ignore[arg-type]
            selectors=selectors,  # type: ignore[arg-type]
            x509_svid_ttl=x509_svid_ttl,
            jwt_svid_ttl=jwt_svid_ttl,
            wit_ttl=wit_ttl,
            dns_names=dns_names,  # type: ignore[arg-type]
            key_custody=key_custody,
            hint=hint,
            admin=admin,
            downstream=downstream,
            expires_at=expires_at,
            revision=1,
            change_seq=0,
            require_residency=require_residency,
        )
        entry = records.validate_entry(draft, self._trust_domain)
        with self._refusing_twins(entry), transaction(self._engine) as conn:
            entry = replace(entry, change_seq=_record_change(conn, entry.id, "create"))
            conn.execute(insert(entries).values(_row(entry)))
            _insert_selectors(conn, entry)
        return entry

    @contextmanager
    def _refusing_twins(self, entry: RegistrationEntry) -> Iterator[None]:
        """Turn the unique index's refusal of an identical entry (same SPIFFE ID,
        parent and selector set; raised by the database, so two servers writing at
        once are refused too) into :class:`EntryExistsError` naming the one there."""
        try:
            yield
        except IntegrityError as e:
            if "identity_hash" not in str(e.orig):
                raise  # another constraint: a bug, not the caller's mistake
            with transaction(self._engine, read_only=True) as conn:
                twin = conn.execute(
                    select(entries.c.id).where(entries.c.identity_hash == _identity(entry))
                ).scalar_one_or_none()
            raise EntryExistsError(
                f"an entry with SPIFFE ID {entry.spiffe_id}, parent {entry.parent_id} and "
                f"the same selectors already exists ({twin or 'just deleted'})"
            ) from None

    def get(self, entry_id: str) -> RegistrationEntry:
        with transaction(self._engine, read_only=True) as conn:
            found = _load(conn, entries.c.id == _entry_id(entry_id))
        if not found:
            raise NotFoundError(f"no registration entry {entry_id[:80]!r}", code="entry_not_found")
        return found[0]

    def list(
        self,
        *,
        parent_id: SpiffeId | str | None = None,
        spiffe_id: SpiffeId | str | None = None,
        selectors: Iterable[Selector | str] | None = None,
        match: SelectorMatch = "exact",
    ) -> builtins.list[RegistrationEntry]:
        """Entries, filtered by parent, SPIFFE ID and selectors (``match``)."""
        if match not in _MATCHES:
            raise InvalidEntryError(
                f"unknown selector match {str(match)[:20]!r}", code="invalid_match"
            )
        where: list[Any] = []
        if parent_id is not None:
            where.append(
                entries.c.parent_id
                == str(records.member_id(parent_id, self._trust_domain, "parent_id"))
            )
        if spiffe_id is not None:
            where.append(
                entries.c.spiffe_id
                == str(records.member_id(spiffe_id, self._trust_domain, "spiffe_id"))
            )
        wanted: frozenset[Selector] | None = None
        if selectors is not None:
            wanted = frozenset(records.selector_tuple(selectors, required=True))
            # Candidates share at least one selector with G (true in every mode,
            # as each entry has one or more); the mode is then applied below.
            shares = or_(
                *(
                    and_(entry_selectors.c.type == s.type, entry_selectors.c.value == s.value)
                    for s in wanted
                )
            )
            where.append(entries.c.id.in_(select(entry_selectors.c.entry_id).where(shares)))
        with transaction(self._engine, read_only=True) as conn:
            found = _load(conn, and_(*where) if where else None)
        if wanted is None:
            return found
        return [e for e in found if _matches(frozenset(e.selectors), wanted, match)]

    def list_by_parents(self, parent_ids: Iterable[SpiffeId | str]) -> EntryLevel:
        """Entries whose parent is any of ``parent_ids``: one query per
        :data:`PARENT_BATCH` parents, not one per parent (the entitlement walk
        asks for a whole level of the tree at once). The same statement says which
        of them have children, so a walk asks for the next level only below those:
        not once more for the 100 workloads of an agent, which have none (issue 8)."""
        wanted = sorted(
            {str(records.member_id(p, self._trust_domain, "parent_id")) for p in parent_ids}
        )
        found: builtins.list[RegistrationEntry] = []
        parents: set[SpiffeId] = set()
        with transaction(self._engine, read_only=True) as conn:
            for start in range(0, len(wanted), PARENT_BATCH):
                batch = wanted[start : start + PARENT_BATCH]
                found.extend(_load(conn, entries.c.parent_id.in_(batch), parents=parents))
        return EntryLevel(found, frozenset(parents))

    def count(self) -> int:
        with transaction(self._engine, read_only=True) as conn:
            return int(conn.execute(select(func.count()).select_from(entries)).scalar_one())

    def update(self, entry: RegistrationEntry) -> RegistrationEntry:
        """Store ``entry`` if the stored revision is still ``entry.revision``.

        Read, change with :func:`dataclasses.replace`, update: a writer that
        read an older revision gets :class:`RevisionConflictError` and nothing
        is written. Returns the entry with its new revision.
        """
        checked = records.validate_entry(entry, self._trust_domain)
        with self._refusing_twins(checked), transaction(self._engine) as conn:
            _lock_feed(conn)
            new = replace(checked, revision=checked.revision + 1)
            values = _row(new)
            del values["id"]
            result = conn.execute(
                update(entries)
                .where(entries.c.id == _entry_id(entry.id), entries.c.revision == entry.revision)
                .values(values)
            )
            if result.rowcount != 1:
                _raise_missing_or_stale(conn, entry.id)
            new = replace(new, change_seq=_record_change(conn, new.id, "update"))
            conn.execute(
                update(entries).where(entries.c.id == new.id).values(change_seq=new.change_seq)
            )
            conn.execute(delete(entry_selectors).where(entry_selectors.c.entry_id == new.id))
            _insert_selectors(conn, new)
        return new

    def delete(self, entry_id: str, *, revision: int | None = None) -> None:
        """Delete an entry (only at ``revision`` when given)."""
        with transaction(self._engine) as conn:
            _lock_feed(conn)
            cond = entries.c.id == _entry_id(entry_id)
            if revision is not None:
                cond = and_(cond, entries.c.revision == revision)
            if conn.execute(delete(entries).where(cond)).rowcount != 1:
                _raise_missing_or_stale(conn, entry_id)
            _record_change(conn, entry_id, "delete")

    def changes_since(self, seq: int, *, limit: int = 1000) -> builtins.list[EntryChange]:
        """Entry writes with a sequence number above ``seq``, oldest first."""
        with transaction(self._engine, read_only=True) as conn:
            rows = conn.execute(
                select(entry_changes)
                .where(entry_changes.c.seq > seq)
                .order_by(entry_changes.c.seq)
                .limit(limit)
            ).all()
        return [EntryChange(seq=r.seq, entry_id=r.entry_id, op=r.op, at=r.at) for r in rows]

    def last_change_seq(self) -> int:
        with transaction(self._engine, read_only=True) as conn:
            return int(
                conn.execute(select(func.coalesce(func.max(entry_changes.c.seq), 0))).scalar_one()
            )


def _entry_id(value: object) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 64:
        raise InvalidEntryError(
            "an entry id is a string of 1 to 64 characters", code="invalid_entry_id"
        )
    return value


def _matches(have: frozenset[Selector], wanted: frozenset[Selector], match: str) -> bool:
    if match == "exact":
        return have == wanted
    if match == "subset":
        return have <= wanted
    if match == "superset":
        return have >= wanted
    return bool(have & wanted)


def _lock_feed(conn: Connection) -> None:
    # PostgreSQL hands out sequence numbers before commit, so two writers could
    # commit 8 before 7 and a reader of "changes since 7" would miss one. Entry
    # writes are rare (operators): serialising them keeps seq order = commit
    # order. SQLite already serialises writers.
    if conn.dialect.name == "postgresql":
        conn.execute(text("LOCK TABLE entry_changes IN SHARE ROW EXCLUSIVE MODE"))


def _record_change(conn: Connection, entry_id: str, op: str) -> int:
    _lock_feed(conn)
    result = conn.execute(insert(entry_changes).values(entry_id=entry_id, op=op, at=time.time()))
    seq = inserted_key(result)
    if conn.dialect.name == "postgresql":
        # Every server LISTENs on this channel (custos.server.events). NOTIFY is
        # transactional: it is delivered when this write commits, never for a
        # write that rolls back.
        conn.execute(text("SELECT pg_notify('custos_entries', :seq)"), {"seq": str(seq)})
    return seq


def _raise_missing_or_stale(conn: Connection, entry_id: str) -> None:
    stored = conn.execute(
        select(entries.c.revision).where(entries.c.id == entry_id)
    ).scalar_one_or_none()
    if stored is None:
        raise NotFoundError(f"no registration entry {entry_id[:80]!r}", code="entry_not_found")
    raise RevisionConflictError(
        f"entry {entry_id} changed (now at revision {stored}); read it again and retry"
    )


def _row(entry: RegistrationEntry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "spiffe_id": str(entry.spiffe_id),
        "parent_id": str(entry.parent_id),
        "x509_svid_ttl": entry.x509_svid_ttl,
        "jwt_svid_ttl": entry.jwt_svid_ttl,
        "wit_ttl": entry.wit_ttl,
        "dns_names": json.dumps(list(entry.dns_names)),
        "key_custody": entry.key_custody,
        "hint": entry.hint,
        "admin": entry.admin,
        "downstream": entry.downstream,
        "expires_at": entry.expires_at,
        "revision": entry.revision,
        "change_seq": entry.change_seq,
        "identity_hash": _identity(entry),
        "require_residency": entry.require_residency,
    }


def _identity(entry: RegistrationEntry) -> str:
    return records.identity_hash(
        str(entry.spiffe_id), str(entry.parent_id), ((s.type, s.value) for s in entry.selectors)
    )


def _insert_selectors(conn: Connection, entry: RegistrationEntry) -> None:
    conn.execute(
        insert(entry_selectors),
        [{"entry_id": entry.id, "type": s.type, "value": s.value} for s in entry.selectors],
    )


def _load(
    conn: Connection, where: Any, *, parents: set[SpiffeId] | None = None
) -> list[RegistrationEntry]:
    # One statement (entries joined with their selectors): one round trip, and
    # under PostgreSQL's READ COMMITTED a second statement could see another
    # writer's newer selectors beside this one's older row.
    query = (
        select(entries, entry_selectors.c.type.label("sel_type"), entry_selectors.c.value)
        .select_from(entries.outerjoin(entry_selectors, entry_selectors.c.entry_id == entries.c.id))
        .order_by(entries.c.id)
    )
    if where is not None:
        query = query.where(where)
    if parents is not None:  # each entry's "is it a parent?" (the parent_id index answers)
        below = entries.alias("below")
        is_parent = exists().where(below.c.parent_id == entries.c.spiffe_id)
        query = query.add_columns(is_parent.label("is_parent"))
    rows: dict[str, RowMapping] = {}
    by_entry: dict[str, list[Selector]] = {}
    # Read through mappings: a column by key costs a tenth of a Row's attribute
    # lookup, and an entry reads sixteen (issue 8, "Speed").
    for r in conn.execute(query).mappings().all():
        entry_id = r["id"]
        selectors = by_entry.get(entry_id)
        if selectors is None:
            rows[entry_id] = r
            selectors = by_entry[entry_id] = []
            if parents is not None and r["is_parent"]:
                parents.add(_spiffe_id(r["spiffe_id"]))
        if r["sel_type"] is not None:
            selectors.append(_selector(r["sel_type"], r["value"]))
    return [_from_row(r, by_entry[key]) for key, r in rows.items()]


#: Distinct IDs and selectors whose parse is remembered (:func:`_spiffe_id`,
#: :func:`_selector`): an agent's entries, their parents and selectors, read again
#: by every issuance call and entries sync.
_PARSED_CACHE_SIZE = 8192


@functools.lru_cache(maxsize=_PARSED_CACHE_SIZE)
def _spiffe_id(text: str) -> SpiffeId:
    """``SpiffeId.parse`` remembered per stored string: the value is immutable and a
    function of the text alone, so a remembered one is the one a parse would make;
    a refusal raises through and is never kept (issue 8, "Speed")."""
    return SpiffeId.parse(text)


@functools.lru_cache(maxsize=_PARSED_CACHE_SIZE)
def _selector(type_: str, value: str) -> Selector:
    """``Selector(type_, value)`` (checked by its constructor) remembered, as :func:`_spiffe_id`."""
    return Selector(type_, value)


def _dns_names(text: str) -> tuple[str, ...]:
    # Most entries have none: "[]" needs no JSON parse.
    return () if text == "[]" else tuple(json.loads(text))


def _from_row(r: RowMapping, selectors: list[Selector]) -> RegistrationEntry:
    return RegistrationEntry(
        id=r["id"],
        spiffe_id=_spiffe_id(r["spiffe_id"]),
        parent_id=_spiffe_id(r["parent_id"]),
        selectors=tuple(sorted(selectors)),
        x509_svid_ttl=r["x509_svid_ttl"],
        jwt_svid_ttl=r["jwt_svid_ttl"],
        wit_ttl=r["wit_ttl"],
        dns_names=_dns_names(r["dns_names"]),
        key_custody=r["key_custody"],
        hint=r["hint"],
        admin=bool(r["admin"]),
        downstream=bool(r["downstream"]),
        expires_at=r["expires_at"],
        revision=r["revision"],
        change_seq=r["change_seq"],
        require_residency=bool(r["require_residency"]),
    )
