"""The datastore's records and their validation (before anything is written)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from custos._numbers import InvalidNumberError, finite_number, seconds
from custos.identity import Selector, SpiffeId, TrustDomain, coerce_spiffe_id
from custos.server.datastore.errors import InvalidEntryError

#: Where an entry's private key lives (issue 8, "Registration entries").
KEY_CUSTODIES = ("tpm", "pkcs11", "memory", "exportable")
#: Longest hint: a label for operators, not a document.
MAX_HINT_LENGTH = 1024
#: A TTL longer than ten years is a typo, not a policy.
MAX_TTL = 10 * 365 * 86400.0
_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


@dataclass(frozen=True)
class RegistrationEntry:
    """One registration entry; ``revision`` is what :meth:`update_entry` expects."""

    id: str
    spiffe_id: SpiffeId
    parent_id: SpiffeId
    selectors: tuple[Selector, ...]
    x509_svid_ttl: float
    jwt_svid_ttl: float
    wit_ttl: float
    dns_names: tuple[str, ...]
    key_custody: str
    hint: str
    admin: bool
    downstream: bool
    expires_at: float | None
    revision: int
    change_seq: int
    #: issue only for keys a TPM proved resident (``key_custody`` "tpm"; decision 0063)
    require_residency: bool = False


@dataclass(frozen=True)
class JoinToken:
    """A join token as stored: its id (not the secret) and lifetime."""

    id: str
    created_at: float
    expires_at: float
    consumed_at: float | None


@dataclass(frozen=True)
class Agent:
    """An attested node agent."""

    id: SpiffeId
    attestor: str
    selectors: tuple[Selector, ...]
    serial: str
    expires_at: float
    evicted: bool
    banned: bool
    updated_at: float
    #: TPM2B_PUBLIC (marshalled) of the attestation key its TPM activated; b"" for an
    #: agent attested without one (decision 0063)
    attestation_key: bytes = b""


@dataclass(frozen=True)
class AuditRecord:
    """One issued credential: who asked, how it attested, what it got."""

    seq: int
    at: float
    who: str
    attestor: str
    selectors: tuple[Selector, ...]
    identity: str
    serial_or_jti: str
    not_after: float
    #: attestation | x509-svid | wit | jwt-svid | agent-renewal ("" before migration 0003)
    event: str = ""
    #: the key custody tier the agent stated, and base64 of its custody evidence
    custody: str = ""
    evidence: str = ""
    #: "" (no tpm-custody key), "proven" or "unproven" (migration 0006, decision 0063)
    residency: str = ""


@dataclass(frozen=True)
class TpmNode:
    """What the last accepted quote of one TPM (by EK hash) said: its activated AK and
    its clock (``tpm_nodes``; decision 0064)."""

    ek_hash: str
    ak_public: bytes
    clock: int
    reset_count: int
    restart_count: int
    updated_at: float


@dataclass(frozen=True)
class EntryChange:
    """One entry write in the change feed (``op``: create, update or delete)."""

    seq: int
    entry_id: str
    op: str
    at: float


def member_id(value: object, trust_domain: TrustDomain, field: str) -> SpiffeId:
    """``value`` as a workload SPIFFE ID of ``trust_domain``."""
    sid = coerce_spiffe_id(value)  # type: ignore[arg-type]  # coerce checks the type
    if not sid.is_member_of(trust_domain):
        raise InvalidEntryError(
            f"{field} {sid} is not in the server's trust domain {trust_domain}",
            code="wrong_trust_domain",
        )
    return sid


def selector_tuple(values: Iterable[Selector | str], *, required: bool) -> tuple[Selector, ...]:
    """Parsed, de-duplicated, sorted selectors (``Selector`` or ``"type:value"``)."""
    if isinstance(values, str | bytes):
        raise InvalidEntryError(
            "selectors must be a list, not one string", code="invalid_selectors"
        )
    parsed = {v if isinstance(v, Selector) else Selector.parse(v) for v in values}
    if required and not parsed:
        raise InvalidEntryError("an entry needs at least one selector", code="no_selectors")
    return tuple(sorted(parsed))


def ttl(value: object, name: str) -> float:
    """A TTL in seconds: finite, > 0, at most :data:`MAX_TTL`."""
    number = seconds(value, name=name, minimum=None, maximum=MAX_TTL)
    if number <= 0:
        raise InvalidNumberError(f"{name} must be more than 0 seconds, not {number:g}")
    return number


def optional_time(value: object, name: str) -> float | None:
    return None if value is None else finite_number(value, name=name, minimum=0)


def key_custody(value: object) -> str:
    if value not in KEY_CUSTODIES:
        raise InvalidEntryError(
            f"key_custody must be one of {', '.join(KEY_CUSTODIES)}, not {str(value)[:40]!r}",
            code="unknown_key_custody",
        )
    return str(value)


def dns_names(values: Iterable[str]) -> tuple[str, ...]:
    if isinstance(values, str | bytes):
        raise InvalidEntryError("dns_names must be a list, not one string", code="invalid_dns_name")
    out: list[str] = []
    for name in values:
        labels = name.lower().split(".") if isinstance(name, str) else []
        if not labels or len(name) > 253 or not all(_DNS_LABEL.fullmatch(x) for x in labels):
            raise InvalidEntryError(f"invalid DNS name {str(name)[:60]!r}", code="invalid_dns_name")
        out.append(name.lower())
    return tuple(dict.fromkeys(out))


def hint(value: object) -> str:
    if not isinstance(value, str) or len(value) > MAX_HINT_LENGTH:
        raise InvalidEntryError(
            f"hint must be a string of at most {MAX_HINT_LENGTH} characters", code="invalid_hint"
        )
    return value


def flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidEntryError(f"{name} must be True or False", code="invalid_flag")
    return value


def validate_residency(require_residency: object, custody: str) -> bool:
    """``require_residency`` checked: a bool, and only on a ``tpm``-custody entry (no
    other tier has a residency proof, so such an entry could never be served)."""
    required = flag(require_residency, "require_residency")
    if required and custody != "tpm":
        raise InvalidEntryError(
            f"require_residency needs key_custody 'tpm', not {custody!r}",
            code="residency_needs_tpm_custody",
        )
    return required


def identity_hash(spiffe_id: str, parent_id: str, selectors: Iterable[tuple[str, str]]) -> str:
    """What makes two entries the same (SPIRE's "entry already exists"): the SPIFFE
    ID, the parent ID and the selector *set*, hashed into the ``entries.identity_hash``
    column whose unique index refuses a second one, also between servers.

    Canonical: selectors as sorted ``[type, value]`` pairs in JSON (a value may hold
    ``:``, so ``type:value`` strings could collide). Migration 0004 holds a frozen copy.
    """
    canonical = json.dumps([spiffe_id, parent_id, sorted(set(selectors))], separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def validate_entry(entry: RegistrationEntry, trust_domain: TrustDomain) -> RegistrationEntry:
    """``entry`` with every field checked and normalised; raises before any write."""
    return RegistrationEntry(
        id=entry.id,
        spiffe_id=member_id(entry.spiffe_id, trust_domain, "spiffe_id"),
        parent_id=member_id(entry.parent_id, trust_domain, "parent_id"),
        selectors=selector_tuple(entry.selectors, required=True),
        x509_svid_ttl=ttl(entry.x509_svid_ttl, "x509_svid_ttl"),
        jwt_svid_ttl=ttl(entry.jwt_svid_ttl, "jwt_svid_ttl"),
        wit_ttl=ttl(entry.wit_ttl, "wit_ttl"),
        dns_names=dns_names(entry.dns_names),
        key_custody=key_custody(entry.key_custody),
        hint=hint(entry.hint),
        admin=flag(entry.admin, "admin"),
        downstream=flag(entry.downstream, "downstream"),
        expires_at=optional_time(entry.expires_at, "expires_at"),
        revision=entry.revision,
        change_seq=entry.change_seq,
        require_residency=validate_residency(
            entry.require_residency, key_custody(entry.key_custody)
        ),
    )
