"""Issuance (issue 8, "Agent API" and "Bad input"): X.509-SVIDs for CSRs, WITs for
public keys and JWT-SVIDs, for the registration entries an agent is entitled to, and
the agent's own X.509-SVID + WIT after attestation.

Rules (decision 0003 and decision 0032):

- the SPIFFE ID, DNS names and TTLs always come from the entry; a CSR contributes
  only its public key, after its signature proved possession of it; no credential
  outlives the entry's ``expires_at`` (every TTL is capped at what is left of it);
- an item the agent may not have (not entitled, expired entry, custody tier other than
  the entry's, a reserved identity or DNS name) or cannot have (bad CSR, weak or
  private key) is refused *per item* with a stable code; the rest of the batch is
  issued. A fault of the server (no signing key, key store or datastore down) fails
  the whole call instead: it says nothing about the item;
- every credential is audited (datastore row + log line) before it is returned, in
  one transaction per batch: if the audit write fails, nothing is returned
  (no unaudited credential); every issuance and refusal is counted in the metrics;
- each signing key used is told the latest expiry of what it signed
  (``note_issued``), so rotation keeps it in the bundle until then — in the same
  transaction as the audit rows (one unit of work, decision 0105).

All methods are synchronous (CPU + datastore): the Agent API calls them through
``asyncio.to_thread``.
"""

from __future__ import annotations

import base64
import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from custos._extras import extra_needed
from custos._jose import (
    PRIVATE_MEMBERS,
    SPIFFE_ALGORITHMS,
    decode_compact,
    import_public_jwk,
    loads_strict,
)
from custos._numbers import seconds
from custos.errors import CustosError
from custos.identity import Selector, SpiffeId
from custos.jwtsvid import mint_jwt_svid
from custos.jwtsvid.errors import JwtArgumentError
from custos.keys.jwk import public_jwk_members
from custos.server.audit import AuditEvent, Auditor
from custos.server.config import ServerConfig
from custos.server.datastore.records import KEY_CUSTODIES, Agent, RegistrationEntry
from custos.server.datastore.server_names import normal_dns_name
from custos.server.datastore.store import Datastore
from custos.server.metrics import ServerMetrics
from custos.server.signing_keys import SigningKey, SigningKeys
from custos.wimse.wit import MAX_TOKEN_BYTES, MAX_WIT_TTL, WitMintError, mint_wit, public_cnf_jwk
from custos.x509.ca import CertificateAuthority, X509Svid, load_csr
from custos.x509.errors import CsrError

#: Most items in one batch call (X.509-SVIDs or WITs); more is one InvalidArgument.
MAX_BATCH = 1000
#: JWT-SVID audiences: at most this many values, each at most this long.
MAX_AUDIENCES = 16
MAX_AUDIENCE_LENGTH = 256
#: Largest TPM2_Certify statement or signature accepted as custody evidence (each).
MAX_CERTIFY_BYTES = 4096
#: Largest TPM2B_PUBLIC of a certified key (RSA-4096: about 600 bytes).
MAX_TPM_PUBLIC_BYTES = 1024
#: Longest public JWK text accepted (an RSA-4096 JWK is under 1 KiB).
MAX_JWK_LENGTH = 8192
#: Largest entry id accepted from an agent (ids are 32 hex characters).
MAX_ENTRY_ID_LENGTH = 64
#: The path prefix custos keeps for its own identities (servers, agents): never
#: issued from a registration entry, so no workload can hold an agent's or a
#: server's SPIFFE ID (SPIRE reserves ``/spire/`` the same way).
RESERVED_PATH_PREFIX = "/custos/"
#: Where agent IDs live: ``spiffe://<td>/custos/agent/<attestor>/<segments>``.
AGENT_PATH_PREFIX = "/custos/agent/"


class IssuanceError(CustosError):
    """An issuance request was refused; ``code`` says why (stable)."""

    code = "issuance_refused"


class NotEntitledError(IssuanceError):
    """The agent may not have credentials for this entry (absent, not its own,
    expired, reserved identity): gRPC PERMISSION_DENIED."""

    code = "not_entitled"


class IssuanceArgumentError(IssuanceError):
    """The request itself is malformed (too many items, bad audience, bad key,
    custody stated wrongly): gRPC INVALID_ARGUMENT."""

    code = "invalid_argument"


class ResidencyError(NotEntitledError):
    """A ``tpm``-custody key's residency is not proven where it must be
    (``residency_unproven``), or its TPM2_Certify evidence is invalid (the code of
    :mod:`custos.tpm.verify`: ``bad_signature``, ``key_not_resident``,
    ``certify_key_mismatch``, ...): PERMISSION_DENIED (decision 0063)."""

    code = "residency_unproven"


@dataclass(frozen=True)
class CustodyEvidence:
    """What the agent says about how a key is held, and for a ``tpm`` key the proof:
    a TPM2_Certify statement (TPMS_ATTEST), its signature (TPMT_SIGNATURE) by the
    agent's attestation key, and the key's TPM2B_PUBLIC (decisions 0032, 0063)."""

    tier: str  # tpm | pkcs11 | memory | exportable
    tpm_certify_info: bytes = b""
    tpm_certify_signature: bytes = b""
    tpm_public: bytes = b""

    def check(self) -> None:
        """Raise :class:`IssuanceArgumentError` for an unknown tier or oversized blobs."""
        if self.tier not in KEY_CUSTODIES:
            raise IssuanceArgumentError(
                f"custody tier must be one of {', '.join(KEY_CUSTODIES)}",
                code="invalid_custody",
            )
        for blob, limit in (
            (self.tpm_certify_info, MAX_CERTIFY_BYTES),
            (self.tpm_certify_signature, MAX_CERTIFY_BYTES),
            (self.tpm_public, MAX_TPM_PUBLIC_BYTES),
        ):
            if not isinstance(blob, bytes) or len(blob) > limit:
                raise IssuanceArgumentError(
                    f"custody evidence blobs must be bytes of at most {limit}",
                    code="invalid_custody",
                )

    @property
    def has_evidence(self) -> bool:
        return bool(self.tpm_certify_info or self.tpm_certify_signature or self.tpm_public)

    def encoded(self) -> str:
        """The evidence as audited: ``base64(info).base64(signature)``, then
        ``.base64(tpm_public)`` when the key's public area was sent; "" when none."""
        if not self.has_evidence:
            return ""
        parts = [self.tpm_certify_info, self.tpm_certify_signature]
        parts += [self.tpm_public] if self.tpm_public else []
        return ".".join(base64.b64encode(b).decode("ascii") for b in parts)


def key_residency(attestation_key: bytes, custody: CustodyEvidence, key: object) -> str:
    """The residency of ``key`` (the public key a credential will bind) held as
    ``custody`` says, as the audit records it (decision 0063):

    - "" for a key not in the ``tpm`` tier (there is nothing to prove);
    - ``unproven`` when the agent has no attestation key, or sent no evidence;
    - ``proven`` when the TPM2_Certify statement is signed by the agent's
      attestation key, certifies the public area sent, that area is fixedTPM |
      fixedParent | sensitiveDataOrigin, and its key is ``key``;
    - evidence sent that does not verify raises :class:`ResidencyError` with the
      code of :mod:`custos.tpm.verify` (a wrong statement is refused, never just
      recorded as unproven).
    """
    if custody.tier != "tpm":
        return ""
    if not custody.has_evidence or not attestation_key:
        return "unproven"
    with extra_needed("tpm"):
        from custos.tpm import verify
    try:
        verify.verify_certify(
            verify.ak_public_checked(attestation_key),
            custody.tpm_certify_info,
            custody.tpm_certify_signature,
            custody.tpm_public,
            expected_key=key,  # type: ignore[arg-type]  # a key the caller parsed
        )
    except verify.AttestationEvidenceError as e:
        raise ResidencyError(f"key residency evidence refused: {e.message}", code=e.code) from e
    return "proven"


@dataclass(frozen=True)
class X509Request:
    entry_id: str
    csr: bytes
    custody: CustodyEvidence


@dataclass(frozen=True)
class WitRequest:
    entry_id: str
    #: the workload's public JWK with "alg", as an object or its JSON text
    public_jwk: Mapping[str, Any] | str
    custody: CustodyEvidence


@dataclass(frozen=True)
class Issued:
    """One item's outcome: exactly one of ``credential`` and ``error``.

    ``spiffe_id`` is the entry's ID, None when the item was refused before the
    entry was known to be the agent's (nothing is told about others' entries)."""

    entry_id: str
    spiffe_id: SpiffeId | None
    credential: X509Svid | str | None
    not_after: float
    error: CustosError | None = None

    def __post_init__(self) -> None:
        if (self.credential is None) == (self.error is None):
            raise ValueError("Issued holds exactly one of credential and error")


@dataclass(frozen=True)
class AgentCredentials:
    """The agent's own identity: an X.509-SVID and a WIT for its key, expiring together."""

    spiffe_id: SpiffeId
    x509_svid: X509Svid
    wit: str
    not_after: float


@dataclass
class _Batch:
    """What one call collects before anything is returned: audit events (written in
    one transaction), the latest expiry per signing key, metric increments."""

    events: list[AuditEvent] = field(default_factory=list)
    expiries: dict[str, float] = field(default_factory=dict)
    issued: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, event: AuditEvent, kid: str) -> None:
        self.events.append(event)
        self.expiries[kid] = max(self.expiries.get(kid, 0.0), event.not_after)
        self.issued[kind] = self.issued.get(kind, 0) + 1


class Issuer:
    def __init__(
        self,
        *,
        config: ServerConfig,
        datastore: Datastore,
        ca_keys: SigningKeys,
        jwt_keys: SigningKeys,
        wit_keys: SigningKeys,
        auditor: Auditor,
        metrics: ServerMetrics,
        entitlement: Callable[[Agent], list[RegistrationEntry]],
    ) -> None:
        self.config = config
        self.datastore = datastore
        self.ca_keys = ca_keys
        self.jwt_keys = jwt_keys
        self.wit_keys = wit_keys
        self.auditor = auditor
        self.metrics = metrics
        self.entitlement = entitlement
        self.trust_domain = config.trust_domain
        # The Agent API's TLS name: no workload certificate may carry it (nor the
        # name of any other server of this datastore: _reserved_dns_names).
        self.server_dns_name = normal_dns_name(config.agent_api.dns_name)

    # -- workload credentials -------------------------------------------------------

    def x509_svids(
        self,
        agent: Agent,
        requests: Sequence[X509Request],
        *,
        then: Callable[[], None] | None = None,
    ) -> list[Issued]:
        """X.509-SVIDs for a batch of CSRs, one :class:`Issued` per request, in order.

        ``then`` runs in the batch's unit of work, also when every request was refused
        (the call's deferred writes: its proof's replay row, decision 0128)."""
        self._check_batch("x509-svid", agent, requests)
        entries = self._entitled(agent)
        reserved = self._reserved_dns_names()
        signer = self.ca_keys.current()
        ca = signer.ca()
        batch = _Batch()
        who = _AgentWho.of(agent)  # once per batch: every row names the same agent
        out: list[Issued] = []
        for request in requests:
            try:
                entry = self._entry_for(entries, request.entry_id, request.custody, reserved)
                residency = self._residency(
                    agent, entry, request.custody, functools.partial(_csr_key, request.csr)
                )
                svid = self._sign_x509(ca, entry, request.csr)
            except IssuanceError as e:
                out.append(self._refused("x509-svid", agent, request.entry_id, e))
                continue
            except CsrError as e:
                out.append(self._refused("x509-svid", agent, request.entry_id, _bad_csr(e)))
                continue
            not_after = svid.expires_at.timestamp()
            batch.add(
                "x509-svid",
                who.event(
                    "x509-svid",
                    entry.spiffe_id,
                    _serial(svid),
                    not_after,
                    request.custody,
                    residency,
                ),
                signer.kid,
            )
            out.append(Issued(request.entry_id, entry.spiffe_id, svid, not_after))
        self._commit(batch, self.ca_keys, then=then)
        return out

    def wits(self, agent: Agent, requests: Sequence[WitRequest]) -> list[Issued]:
        """WIT-SVIDs binding the given public keys, one :class:`Issued` per request."""
        self._check_batch("wit", agent, requests)
        entries = self._entitled(agent)
        reserved = self._reserved_dns_names()
        signer = self.wit_keys.current()
        batch = _Batch()
        who = _AgentWho.of(agent)
        out: list[Issued] = []
        for request in requests:
            try:
                entry = self._entry_for(entries, request.entry_id, request.custody, reserved)
                jwk = _workload_jwk(request.public_jwk)
                residency = self._residency(
                    agent,
                    entry,
                    request.custody,
                    functools.partial(import_public_jwk, jwk, alg=jwk["alg"]),
                )
            except IssuanceError as e:
                out.append(self._refused("wit", agent, request.entry_id, e))
                continue
            token, jti, not_after = self._mint_wit(
                signer, entry.spiffe_id, jwk, min(entry.wit_ttl, self._ttl_cap(entry))
            )
            batch.add(
                "wit",
                who.event("wit", entry.spiffe_id, jti, not_after, request.custody, residency),
                signer.kid,
            )
            out.append(Issued(request.entry_id, entry.spiffe_id, token, not_after))
        self._commit(batch, self.wit_keys)
        return out

    def jwt_svid(self, agent: Agent, entry_id: str, audience: Sequence[str]) -> Issued:
        """A JWT-SVID for one entry and audience (1 to 16 values, each <= 256 characters)."""
        entries = self._entitled(agent)
        try:
            aud = _audience(audience)
            entry = self._entry_for(entries, entry_id, None, self._reserved_dns_names())
            if entry.require_residency and not agent.attestation_key:
                # A JWT-SVID binds no key, but the entry is only for agents whose TPM
                # can prove its keys; one without an attestation key cannot (0063).
                raise ResidencyError(
                    f"entry {entry_id!r} requires TPM-proven key residency and this agent "
                    "has no attestation key"
                )
        except IssuanceError as e:
            return self._refused("jwt-svid", agent, entry_id, e)
        signer = self.jwt_keys.current()
        try:
            token = mint_jwt_svid(
                signer.key,
                alg=signer.record.alg,
                kid=signer.kid,
                spiffe_id=entry.spiffe_id,
                audience=aud,
                ttl=_whole_seconds(min(entry.jwt_svid_ttl, self._ttl_cap(entry))),
                jti=True,
            )
        except JwtArgumentError as e:  # an audience mint_jwt_svid's own rules refuse
            return self._refused(
                "jwt-svid",
                agent,
                entry_id,
                IssuanceArgumentError(e.message, code="invalid_audience"),
            )
        claims = decode_compact(token, max_length=MAX_TOKEN_BYTES).claims
        not_after = float(claims["exp"])
        batch = _Batch()
        event = self._event("jwt-svid", agent, entry.spiffe_id, claims["jti"], not_after, None)
        batch.add("jwt-svid", event, signer.kid)
        self._commit(batch, self.jwt_keys)
        return Issued(entry_id, entry.spiffe_id, token, not_after)

    # -- the agent's own identity ---------------------------------------------------

    def agent_credentials(
        self,
        agent_id: SpiffeId,
        csr: bytes,
        custody: CustodyEvidence,
        *,
        attestor: str,
        selectors: Sequence[Selector],
        ttl: float | None = None,
        residency: str = "",
        record: Callable[[AgentCredentials], None] | None = None,
    ) -> AgentCredentials:
        """The agent's X.509-SVID and WIT for the key of ``csr`` (held as ``custody``
        says), expiring together; audited (``x509-svid`` and ``wit`` events whose
        identity is the agent) before they are returned. Raises on any refusal.

        ``ttl`` defaults to ``x509_svid.default_ttl``; both credentials are clamped
        to the CA certificate's not-after. ``residency`` is what the caller (node
        attestation, which checked the key's certify evidence: :func:`key_residency`)
        found, for the audit rows. The caller records the agent and audits the
        attestation itself: in ``record(credentials)``, which runs inside the unit of
        work of the credentials' audit rows (decision 0108), so that all of it commits
        together or, when anything raises, none of it."""
        if (
            not isinstance(agent_id, SpiffeId)
            or not agent_id.is_member_of(self.trust_domain)
            or not agent_id.path.startswith(AGENT_PATH_PREFIX)
        ):
            # Only agent IDs: this path skips the entitlement check, so it must not
            # be able to mint a workload's (or a server's) identity.
            raise IssuanceArgumentError(
                f"an agent ID is spiffe://{self.trust_domain.name}{AGENT_PATH_PREFIX}...",
                code="invalid_agent_id",
            )
        custody.check()
        lifetime = (
            self.config.x509_svid.default_ttl.total_seconds()
            if ttl is None
            else seconds(ttl, name="ttl", minimum=1)
        )
        signer = self.ca_keys.current()
        wit_signer = self.wit_keys.current()
        # Signing first checks the CSR (parse, proof of possession, key type); a
        # certificate for a key refused below is dropped unaudited, never returned.
        svid = signer.ca().sign_x509_svid(
            csr, agent_id, timedelta(seconds=_whole_seconds(lifetime))
        )
        alg = agent_key_alg(svid.leaf.public_key(), load_csr(csr).signature_algorithm_parameters)
        not_after = svid.expires_at.timestamp()
        jwk = {**public_jwk_members(svid.leaf.public_key()), "alg": alg}
        # The WIT ends with the certificate (clamped to the CA) so the agent renews both at once.
        wit, jti, wit_not_after = self._mint_wit(
            wit_signer, agent_id, jwk, max(1.0, not_after - time.time())
        )
        who = _AgentWho(str(agent_id), attestor, tuple(selectors))
        x509_batch, wit_batch = _Batch(), _Batch()
        x509_batch.add(
            "agent-x509-svid",
            who.event("x509-svid", agent_id, _serial(svid), not_after, custody, residency),
            signer.kid,
        )
        wit_batch.add(
            "agent-wit",
            who.event("wit", agent_id, jti, wit_not_after, custody, residency),
            wit_signer.kid,
        )
        credentials = AgentCredentials(agent_id, svid, wit, min(not_after, wit_not_after))
        self._commit(
            x509_batch,
            self.ca_keys,
            also=(wit_batch, self.wit_keys),
            then=None if record is None else functools.partial(record, credentials),
        )
        return credentials

    # -- the parts ------------------------------------------------------------------

    def _entitled(self, agent: Agent) -> dict[str, RegistrationEntry]:
        return {e.id: e for e in self.entitlement(agent)}

    def _entry_for(
        self,
        entries: Mapping[str, RegistrationEntry],
        entry_id: str,
        custody: CustodyEvidence | None,
        reserved_dns_names: frozenset[str],
    ) -> RegistrationEntry:
        """The entitled entry ``entry_id`` if this request may have a credential for it."""
        if not isinstance(entry_id, str) or not 0 < len(entry_id) <= MAX_ENTRY_ID_LENGTH:
            raise IssuanceArgumentError(
                "entry_id must be 1 to 64 characters", code="invalid_entry_id"
            )
        if custody is not None:
            custody.check()
        entry = entries.get(entry_id)
        # One answer for "no such entry" and "someone else's entry": an agent
        # learns nothing about entries it does not serve.
        if entry is None:
            raise NotEntitledError(f"this agent is not entitled to entry {entry_id!r}")
        if _entry_left(entry) < 1:
            # Under a second left is expired too: a credential is at least a second long
            # and must not outlive the entry.
            raise NotEntitledError(f"entry {entry_id!r} has expired", code="entry_expired")
        if entry.spiffe_id.path == "/custos/server" or entry.spiffe_id.path.startswith(
            RESERVED_PATH_PREFIX
        ):
            raise NotEntitledError(
                f"entry {entry_id!r} names a custos server or agent identity, which no "
                "workload may hold",
                code="reserved_spiffe_id",
            )
        if custody is not None and custody.tier != entry.key_custody:
            raise IssuanceArgumentError(
                f"entry {entry_id!r} wants its key held as {entry.key_custody!r}, "
                f"not {custody.tier!r}",
                code="custody_mismatch",
            )
        taken = sorted(reserved_dns_names.intersection(map(normal_dns_name, entry.dns_names)))
        if taken:
            raise NotEntitledError(
                f"entry {entry_id!r} asks for the DNS name {taken[0]!r} of a custos server",
                code="reserved_dns_name",
            )
        return entry

    def _residency(
        self,
        agent: Agent,
        entry: RegistrationEntry,
        custody: CustodyEvidence,
        key: Callable[[], object],
    ) -> str:
        """The residency of the request's key (``key()`` parses it, only when there is
        evidence to check), refused when invalid, or unproven on an entry that
        requires it (``residency_unproven``)."""
        residency = key_residency(
            agent.attestation_key,
            custody,
            key() if custody.tier == "tpm" and custody.has_evidence else None,
        )
        if entry.require_residency and residency != "proven":
            why = (
                "the agent has no attestation key"
                if not agent.attestation_key
                else "the request carries no certify evidence"
            )
            raise ResidencyError(f"entry {entry.id!r} requires TPM-proven key residency and {why}")
        return residency

    def _reserved_dns_names(self) -> frozenset[str]:
        """Every server's DNS name: this one's, and those every server of the datastore
        recorded at start (they may be configured differently; an agent trusts each)."""
        return self.datastore.server_names.names() | {self.server_dns_name}

    def _ttl_cap(self, entry: RegistrationEntry) -> float:
        """How long a WIT or JWT-SVID may live: until the current CA certificate ends
        (as X.509-SVIDs, whatever the entry asks), at most a WIT's one year, and never
        past the entry's own ``expires_at``."""
        ca_end = self.ca_keys.current().certificate().not_valid_after_utc.timestamp()
        return min(ca_end - time.time(), MAX_WIT_TTL, _entry_left(entry))

    def _sign_x509(
        self, ca: CertificateAuthority, entry: RegistrationEntry, csr: bytes
    ) -> X509Svid:
        return ca.sign_x509_svid(
            csr,
            entry.spiffe_id,
            timedelta(seconds=_whole_seconds(min(entry.x509_svid_ttl, _entry_left(entry)))),
            entry.dns_names,
        )

    def _mint_wit(
        self, signer: SigningKey, subject: SpiffeId, jwk: Mapping[str, Any], ttl: float
    ) -> tuple[str, str, float]:
        """(token, jti, exp) of a WIT-SVID for ``subject`` binding ``jwk``."""
        token = mint_wit(
            signer.key,
            alg=signer.record.alg,
            kid=signer.kid,
            subject=subject,
            workload_public_jwk=jwk,
            ttl=_whole_seconds(ttl),
            profile="spiffe",
        )
        claims = decode_compact(token, max_length=MAX_TOKEN_BYTES).claims
        return token, str(claims["jti"]), float(claims["exp"])

    def _event(
        self,
        event: str,
        agent: Agent,
        identity: SpiffeId,
        serial_or_jti: str,
        not_after: float,
        custody: CustodyEvidence | None,
        residency: str = "",
    ) -> AuditEvent:
        return _AgentWho.of(agent).event(
            event, identity, serial_or_jti, not_after, custody, residency
        )

    def _check_batch(self, kind: str, agent: Agent, requests: Sequence[object]) -> None:
        if len(requests) > MAX_BATCH:
            error = IssuanceArgumentError(
                f"a batch holds at most {MAX_BATCH} requests, not {len(requests)}",
                code="batch_too_large",
            )
            self.metrics.refused.labels(kind=kind, code=error.code).inc()
            self.auditor.refused(event=kind, who=str(agent.id), identity="", code=error.code)
            raise error

    def _refused(self, kind: str, agent: Agent, entry_id: str, error: IssuanceError) -> Issued:
        entry_id = str(entry_id)[:MAX_ENTRY_ID_LENGTH]
        self.metrics.refused.labels(kind=kind, code=error.code).inc()
        self.auditor.refused(event=kind, who=str(agent.id), identity=entry_id, code=error.code)
        return Issued(entry_id, None, None, 0.0, error)

    def _commit(
        self,
        batch: _Batch,
        keys: SigningKeys,
        *,
        also: tuple[_Batch, SigningKeys] | None = None,
        then: Callable[[], None] | None = None,
    ) -> None:
        """Audit every credential of the call and tell the keys how long what they
        signed lives, then the caller's ``then`` writes, in one unit of work (one
        commit, decisions 0105 and 0108; the caller's when it has one open). Raises
        (nothing returned) if any fails."""
        parts = [(batch, keys)] if also is None else [(batch, keys), also]
        events = [e for b, _ in parts for e in b.events]
        if not events and then is None:
            return
        with self.datastore.unit_of_work():
            if events:
                self.auditor.record_many(events)
            for part, manager in parts:
                for kid, not_after in part.expiries.items():
                    manager.note_issued(kid, not_after)
            if then is not None:
                then()
        for part, _ in parts:
            for kind, count in part.issued.items():
                self.metrics.issued.labels(kind=kind).inc(count)


@dataclass(frozen=True)
class _AgentWho:
    """The requesting agent as the audit names it."""

    who: str
    attestor: str
    selectors: tuple[Selector, ...]

    @classmethod
    def of(cls, agent: Agent) -> _AgentWho:
        return cls(str(agent.id), agent.attestor, agent.selectors)

    def event(
        self,
        event: str,
        identity: SpiffeId,
        serial_or_jti: str,
        not_after: float,
        custody: CustodyEvidence | None,
        residency: str = "",
    ) -> AuditEvent:
        return AuditEvent(
            event=event,
            who=self.who,
            attestor=self.attestor,
            selectors=self.selectors,
            identity=str(identity),
            serial_or_jti=serial_or_jti,
            not_after=not_after,
            custody="" if custody is None else custody.tier,
            evidence="" if custody is None else custody.encoded(),
            residency=residency,
        )


def _audience(audience: Sequence[str]) -> list[str]:
    values = [audience] if isinstance(audience, str) else list(audience)
    if not 1 <= len(values) <= MAX_AUDIENCES or not all(
        isinstance(a, str) and 0 < len(a) <= MAX_AUDIENCE_LENGTH for a in values
    ):
        raise IssuanceArgumentError(
            f"a JWT-SVID needs 1 to {MAX_AUDIENCES} audiences of 1 to "
            f"{MAX_AUDIENCE_LENGTH} characters",
            code="invalid_audience",
        )
    return values


def _workload_jwk(jwk: Mapping[str, Any] | str) -> dict[str, Any]:
    """The public JWK a WIT may bind (an object, or its JSON text as the wire carries
    it): public members + ``alg`` (ES/RS/PS), no weak key."""
    if isinstance(jwk, str):
        if len(jwk) > MAX_JWK_LENGTH:
            raise IssuanceArgumentError(
                f"the public JWK is longer than {MAX_JWK_LENGTH} characters",
                code="invalid_public_key",
            )
        try:
            jwk = loads_strict(jwk)
        except ValueError:
            raise IssuanceArgumentError(
                "the public JWK is not one strict JSON object", code="invalid_public_key"
            ) from None
    if not isinstance(jwk, Mapping):
        raise IssuanceArgumentError(
            "the public key must be a JWK object", code="invalid_public_key"
        )
    if not jwk.keys().isdisjoint(PRIVATE_MEMBERS):
        # Refused by name: a private key sent to the server is a bug worth seeing.
        raise IssuanceArgumentError(
            "the JWK holds private key material; send the public key only",
            code="private_key_sent",
        )
    try:
        return public_cnf_jwk(jwk, SPIFFE_ALGORITHMS)
    except WitMintError as e:
        raise IssuanceArgumentError(e.message, code="invalid_public_key") from e


def agent_key_alg(public: object, params: object) -> str:
    """The JOSE alg of the agent's key, as its CSR was signed (WIT-SVIDs: ES/RS/PS)."""
    if isinstance(public, ec.EllipticCurvePublicKey):
        alg = {"secp256r1": "ES256", "secp384r1": "ES384"}.get(public.curve.name)
        if alg is not None:
            return alg
    if isinstance(public, rsa.RSAPublicKey):
        return "PS256" if isinstance(params, padding.PSS) else "RS256"
    raise IssuanceArgumentError(
        "an agent key must be EC P-256/P-384 or RSA: WIT-SVIDs take no other keys",
        code="invalid_public_key",
    )


def _csr_key(csr: bytes) -> object:
    """The public key of a CSR (CsrError when it does not parse: the item's refusal)."""
    if not isinstance(csr, bytes):
        raise IssuanceArgumentError("the CSR must be bytes", code="invalid_csr")
    try:
        return load_csr(csr).public_key()
    except (ValueError, TypeError) as e:
        raise IssuanceArgumentError("the CSR holds no usable key", code="invalid_csr") from e


def _bad_csr(error: CsrError) -> IssuanceArgumentError:
    return IssuanceArgumentError(error.message, code="invalid_csr")


def _serial(svid: X509Svid) -> str:
    return format(svid.leaf.serial_number, "x")


def _entry_left(entry: RegistrationEntry) -> float:
    """Seconds until ``entry.expires_at`` (infinite without one): no credential issued
    from an entry outlives it, or an entry's end would not end the identity."""
    return math.inf if entry.expires_at is None else entry.expires_at - time.time()


def _whole_seconds(value: float) -> int:
    # NumericDates and certificate times are whole seconds; a TTL under one would vanish.
    return max(1, int(value))
