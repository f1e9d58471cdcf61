"""Workload credentials: the entry stream → a device key per generation → an
X.509-SVID and a WIT for that key → persisted → served; rotation; clean-up.

:class:`WorkloadManager` follows ``SyncEntries`` (reconnecting with backoff) and, for
every entry this node serves:

1. refuses (logs and counts, once per entry revision) an entry whose custody tier the
   node does not offer (:class:`~custos.agent.custody.CustodyTierMissingError`);
2. creates a fresh key ``wl-<entry id>-<generation>`` in the entry's tier, has the key
   sign a CSR (proof of possession), and asks for the X.509-SVID (``BatchNewX509SVID``)
   and the WIT (``BatchNewWIT``, the same key's public JWK) in batches of at most
   :data:`MAX_BATCH` per wake-up; both credentials of a generation share that key;
3. writes ``data_dir/workloads/<entry id>.json`` (atomically, :mod:`custos.agent.state`)
   only once both credentials arrived, then publishes the new generation to
   :class:`~custos.agent.identities.WorkloadIdentities` and schedules the previous
   key's deletion for when its credentials expire;
4. rotates at half the credentials' lifetime ± ``jitter`` (a fresh key every time,
   creds-02 §9.4), and re-issues at once when the entry's SPIFFE ID, DNS names, TTLs
   or custody tier change (a change of selectors or hint is only re-published).

An entry that leaves the set is no longer served (its file is removed at once); its
key is deleted once its credentials expire.  While the server is unreachable the
credentials in hand are served until they expire, and rotation is retried with
backoff.

**Start**: credential files whose key still exists (and certifies that key) and that
have not expired are served at once, without the server.  Then every ``wl-*`` key that
no credential file names is deleted: a ``kill -9`` between key creation and the
credential file leaves a key that nothing ever used, and a ``kill -9`` after the file
and before the old key's deletion leaves the old key; both go.  Decision 0050.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from custos._numbers import finite_number
from custos.agent.client.attest import make_csr
from custos.agent.client.calls import IssuedWit, IssuedX509, WitParams, X509Params
from custos.agent.client.errors import AgentApiError
from custos.agent.client.streams import AgentEntry, EntrySet, sync_entries
from custos.agent.custody import Custody
from custos.agent.identities import (
    DEFAULT_BACKOFF,
    Backoff,
    NodeLink,
    WorkloadIdentities,
    WorkloadIdentity,
    raise_if_cancelling,
    wait_at_most,
)
from custos.agent.residency import CertifyEvidence, KeyResidency
from custos.agent.state import ensure_private_dir, read_json, remove_file, write_json_atomic
from custos.errors import CustosError
from custos.identity import Selector, SpiffeId
from custos.keys import Algorithm, KeyNotFoundError, StoreKey
from custos.keys.aio import device_lock
from custos.keys.jwk import public_jwk
from custos.wimse.wit import parse_wit_unverified
from custos.x509 import load_certificates

log = logging.getLogger(__name__)

#: Workload keys are ``wl-<entry id>-<generation>`` in the entry's tier's store.
KEY_PREFIX = "wl-"
#: Entry ids this agent accepts: they become file and key names.
_ENTRY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_KEY_NAME = re.compile(r"wl-([A-Za-z0-9][A-Za-z0-9_-]{0,63})-([0-9]{1,18})")
WORKLOADS_DIR = "workloads"
_STATE_VERSION = 1
#: Credentials asked for in one call (the server takes up to 1,000).
MAX_BATCH = 100
#: Workload keys are made with this algorithm in every tier (TPMs, HSMs and
#: WIT-SVIDs all take it; WIT-SVIDs take no EdDSA).
KEY_ALGORITHM = Algorithm.ES256
#: Entries carrying a selector of this type are node aliases or node groups, never a
#: workload (no workload attestor makes ``spiffe_id:`` selectors): no key for them.
NODE_SELECTOR_TYPE = "spiffe_id"
#: The longest the loop sleeps without looking again (a wall-clock jump heals).
_MAX_SLEEP = 30.0
#: Refusal counters (``WorkloadManager.refused``): why an entry got no credentials.
REFUSED_TIER_MISSING = "custody_tier_missing"
REFUSED_ENTRY_ID = "entry_id_unusable"


def key_name(entry_id: str, generation: int) -> str:
    return f"{KEY_PREFIX}{entry_id}-{generation}"


def parse_key_name(name: str) -> tuple[str, int] | None:
    """``(entry id, generation)`` of a workload key name, or ``None``."""
    match = _KEY_NAME.fullmatch(name)
    return None if match is None else (match.group(1), int(match.group(2)))


@dataclass(frozen=True)
class _Issued:
    """One generation of one entry's credentials: what its file holds."""

    entry: AgentEntry
    generation: int
    key: StoreKey
    chain: tuple[x509.Certificate, ...]
    wit: str
    not_after: float
    issued_at: float
    rotate_at: float

    @functools.cached_property
    def identity(self) -> WorkloadIdentity:
        """One object per generation (and entry revision): a caller can tell a
        rotation by identity."""
        return WorkloadIdentity(
            entry_id=self.entry.id,
            spiffe_id=self.entry.spiffe_id,
            hint=self.entry.hint,
            custody=self.entry.key_custody,
            selectors=self.entry.selectors,
            x509_svid=self.chain,
            wit=self.wit,
            key=self.key,
            not_after=self.not_after,
        )


@dataclass(frozen=True)
class _Prepared:
    entry: AgentEntry
    generation: int
    key: StoreKey
    csr: bytes
    public: PublicKeyTypes
    jwk: dict[str, Any]
    evidence: CertifyEvidence | None = None


def _csr_and_key(key: StoreKey) -> tuple[bytes, PublicKeyTypes]:
    return make_csr(key), key.public_key()


def _credential_fields(entry: AgentEntry) -> tuple[object, ...]:
    """What the credentials carry: a change of any of these needs new ones."""
    return (entry.spiffe_id, entry.dns_names, entry.key_custody, entry.x509_svid_ttl, entry.wit_ttl)


def _spki(key: object) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)  # type: ignore[attr-defined,no-any-return]


def _uri_sans(certificate: x509.Certificate) -> list[str]:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(san.value.get_values_for_type(x509.UniformResourceIdentifier))


class WorkloadManager:
    """See the module docstring.

    ``node`` is the agent's own identity (its current Agent API client and bundle),
    ``custody`` the node's tiers, ``data_dir`` the agent's data directory; ``jitter``
    (``rotation.jitter``, a fraction of half the lifetime) spreads rotations; ``now``
    is the clock (tests inject one and call :meth:`wake` after moving it).
    """

    def __init__(
        self,
        *,
        node: NodeLink,
        custody: Custody,
        data_dir: Path,
        jitter: float = 0.1,
        backoff: Backoff = DEFAULT_BACKOFF,
        now: Callable[[], float] = time.time,
        identities: WorkloadIdentities | None = None,
        residency: KeyResidency | None = None,
    ) -> None:
        if not 0.0 <= jitter < 1.0:
            raise CustosError(
                f"rotation.jitter must be in [0, 1), not {jitter!r}", code="invalid_jitter"
            )
        self._node = node
        self._custody = custody
        # Certifies tpm-tier keys with the node attestor's AK (a TPM-attested node).
        self._residency = residency or KeyResidency(None)
        self._dir = data_dir / WORKLOADS_DIR
        self._jitter = jitter
        self._backoff = backoff
        self._now = now
        self.identities = identities or WorkloadIdentities(node, now=now)
        #: Why entries got no credentials, by reason code (custody_tier_missing, ...).
        self.refused: Counter[str] = Counter()
        self._served: dict[str, _Issued] = {}
        self._entries: dict[str, AgentEntry] | None = None  # None: no set from the server yet
        self._generations: dict[str, int] = {}  # the highest generation used, per entry
        self._deletions: dict[tuple[str, str], float] = {}  # (tier, key name) -> when
        # Retries wait on the monotonic clock: they are delays, not credential times,
        # and a wall clock stepped back must not postpone them.
        self._retry: dict[str, tuple[float, int]] = {}  # entry -> (monotonic when, attempts)
        self._server_retry = (0.0, 0)
        self._refused_revisions: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._entry_sets = 0

    # ---- life cycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Serve what the data directory holds, clear orphaned keys, then follow the
        server in the background."""
        await asyncio.to_thread(ensure_private_dir, self._dir)
        await self._restore()
        await self._delete_orphans()
        self._publish()
        self._tasks = [
            asyncio.create_task(self._run(), name="custos-workloads"),
            asyncio.create_task(self._follow_entries(), name="custos-workloads-entries"),
            asyncio.create_task(self._follow_bundle(), name="custos-workloads-bundle"),
        ]

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        # The tasks loop until cancelled: nothing but the cancellation comes back.
        await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> WorkloadManager:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def wake(self) -> None:
        """Look at every entry again now (after an injected clock moved)."""
        self._wake.set()

    @property
    def entry_sets(self) -> int:
        """Entry sets received from the server so far."""
        return self._entry_sets

    # ---- the main loop -------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                timeout = await self._step()
            except Exception:  # one bad step must not stop serving what is in hand
                raise_if_cancelling()
                log.exception("workload credential step failed; trying again")
                timeout = self._backoff.delay(3)
            raise_if_cancelling()  # a cancelled gRPC call may come back as an error
            await wait_at_most(self._wake.wait(), timeout)

    async def _step(self) -> float:
        """Expire, drop, issue, delete; returns how long to sleep (seconds)."""
        now = self._now()
        changed = self._expire(now)
        if self._entries is not None:
            changed = await self._follow_set(self._entries, now) or changed
        if changed:
            self._publish()
        due = self._due(now)
        for start in range(0, len(due), MAX_BATCH):
            await self._issue(due[start : start + MAX_BATCH])
        await self._delete_due(self._now())
        self._forget_gone()
        return self._next_wake()

    def _forget_gone(self) -> None:
        """Drop the bookkeeping of entries that are gone for good (not in the set, not
        served, no key left to delete), so a long-lived agent does not grow with churn."""
        if self._entries is None:
            return
        keep = set(self._entries) | set(self._served)
        keep |= {parsed[0] for _, name in self._deletions if (parsed := parse_key_name(name))}
        for table in (self._generations, self._retry):
            for entry_id in [e for e in table if e not in keep]:
                del table[entry_id]

    def _expire(self, now: float) -> bool:
        expired = [i for i in self._served.values() if i.not_after <= now]
        for issued in expired:
            log.warning(
                "credentials of %s (entry %s) expired without a rotation; no longer served",
                issued.entry.spiffe_id,
                issued.entry.id,
                extra={"code": "workload_credentials_expired"},
            )
            self._unserve(issued, delete_at=now)
        return bool(expired)

    async def _follow_set(self, entries: Mapping[str, AgentEntry], now: float) -> bool:
        """Drop what left the set; re-publish entries whose selectors or hint changed."""
        changed = False
        for entry_id, issued in list(self._served.items()):
            entry = entries.get(entry_id)
            if entry is None or not self._serves(entry):
                log.info(
                    "entry %s (%s) is no longer this node's: not served",
                    entry_id,
                    issued.entry.spiffe_id,
                )
                self._unserve(issued, delete_at=issued.not_after)
                changed = True
            elif entry != issued.entry and _credential_fields(entry) == _credential_fields(
                issued.entry
            ):
                updated = replace(issued, entry=entry)
                self._served[entry_id] = updated
                await asyncio.to_thread(self._persist, updated)
                changed = True
        return changed

    def _unserve(self, issued: _Issued, *, delete_at: float) -> None:
        del self._served[issued.entry.id]
        self._retry.pop(issued.entry.id, None)
        self._deletions[(issued.entry.key_custody, issued.key.name)] = delete_at
        try:
            remove_file(self._path(issued.entry.id))
        except CustosError as e:
            log.warning("%s", e.message, extra={"code": e.code})

    def _serves(self, entry: AgentEntry) -> bool:
        """Whether this entry gets a workload key at all (a node alias does not)."""
        return all(s.type != NODE_SELECTOR_TYPE for s in entry.selectors)

    def _due(self, now: float) -> list[AgentEntry]:
        if self._entries is None or self._server_retry[0] > time.monotonic():
            return []
        due: list[AgentEntry] = []
        monotonic = time.monotonic()
        for entry_id in sorted(self._entries):
            entry = self._entries[entry_id]
            if not self._serves(entry) or self._retry.get(entry_id, (0.0, 0))[0] > monotonic:
                continue
            if not self._custody.offers(entry.key_custody):
                self._refuse_tier(entry)
                continue
            issued = self._served.get(entry_id)
            if (
                issued is None
                or issued.rotate_at <= now
                or _credential_fields(issued.entry) != _credential_fields(entry)
            ):
                due.append(entry)
        return due

    def _refuse_tier(self, entry: AgentEntry) -> None:
        if self._refused_revisions.get(entry.id) == entry.revision:
            return  # said and counted once per revision
        self._refused_revisions[entry.id] = entry.revision
        self.refused[REFUSED_TIER_MISSING] += 1
        log.warning(
            "entry %s (%s) asks for the %r custody tier, which this node does not offer "
            "(it offers: %s): refused",
            entry.id,
            entry.spiffe_id,
            entry.key_custody,
            ", ".join(sorted(self._custody.tiers)) or "none",
            extra={"code": REFUSED_TIER_MISSING},
        )
        issued = self._served.get(entry.id)
        if issued is not None:  # it changed tier: what it had is for the old tier
            self._unserve(issued, delete_at=issued.not_after)
            self._publish()

    def _next_wake(self) -> float:
        """Seconds until something is due (a rotation, an expiry, a deletion, a retry)."""
        now, monotonic = self._now(), time.monotonic()
        # A rotation that is due but cannot happen yet (no entry set, a retry pending)
        # must not wake the loop in a spin: its retry time wakes it.
        blocked = self._entries is None or self._server_retry[0] > monotonic
        times = [
            i.rotate_at
            for i in self._served.values()
            if not blocked and self._retry.get(i.entry.id, (0.0, 0))[0] <= monotonic
        ]
        times += [i.not_after for i in self._served.values()]
        times += self._deletions.values()
        delays = [at - now for at in times]
        retries = [at for at, _ in self._retry.values()]
        if self._server_retry[0]:
            retries.append(self._server_retry[0])
        delays += [at - monotonic for at in retries]
        return max(0.0, min([_MAX_SLEEP, *delays]))

    # ---- issuance ------------------------------------------------------------------------

    async def _issue(self, entries: Sequence[AgentEntry]) -> None:
        try:
            client = self._node.client  # first: no key is made for a node without identity
        except CustosError as e:
            self._server_unusable(e)
            return
        prepared = [p for p in [await self._prepare(e) for e in entries] if p is not None]
        if not prepared:
            return
        try:
            x509s, wits = await asyncio.gather(
                client.new_x509_svids(
                    [
                        X509Params(p.entry.id, p.csr, p.entry.key_custody, p.evidence, p.public)
                        for p in prepared
                    ]
                ),
                client.new_wits(
                    [
                        WitParams(p.entry.id, p.jwk, p.entry.key_custody, p.evidence)
                        for p in prepared
                    ]
                ),
            )
        except AgentApiError as e:
            self._node.report_refused(e)
            self._server_unusable(e)
            for p in prepared:
                await self._delete_key(p.entry.key_custody, p.key.name)
            return
        self._server_retry = (0.0, 0)
        for p, x, w in zip(prepared, x509s, wits, strict=True):
            await self._receive(p, x, w)
        self._publish()

    def _server_unusable(self, e: CustosError) -> None:
        """No credentials from the server now: back off, serve what is in hand."""
        _, attempts = self._server_retry
        delay = self._backoff.delay(attempts)
        self._server_retry = (time.monotonic() + delay, attempts + 1)
        log.warning(
            "could not get workload credentials (%s: %s); serving what is in hand, "
            "trying again in %.1f s",
            e.code,
            e.message,
            delay,
            extra={"code": e.code},
        )

    async def _prepare(self, entry: AgentEntry) -> _Prepared | None:
        """A fresh key in the entry's tier, its CSR and its public JWK (and, for a
        ``tpm``-tier key on a TPM-attested node, the AK's certify of it)."""
        generation = self._generations.get(entry.id, 0) + 1
        self._generations[entry.id] = generation
        name = key_name(entry.id, generation)
        facade = self._custody.async_store_for(entry.key_custody)
        try:
            info = await facade.create(name, KEY_ALGORITHM)
        except CustosError as e:
            self._entry_failed(entry, f"could not create key {name}", e)
            return None
        key = StoreKey(facade.store, info)
        try:
            # The CSR is signed inside the device: one call at a time, off the loop.
            async with device_lock(facade.store):
                # The public key comes along in the same hop: the reply is checked
                # against it (X509Params.public_key), not against the CSR parsed again,
                # and the WIT's JWK is made from it, not read from the device again.
                csr, public = await asyncio.to_thread(_csr_and_key, key)
            jwk = public_jwk(public, key.alg)
        except CustosError as e:
            self._entry_failed(entry, f"key {name} could not sign its CSR", e)
            await self._delete_key(entry.key_custody, name)
            return None
        try:
            async with device_lock(facade.store):
                evidence = await asyncio.to_thread(self._residency.evidence, key, entry.key_custody)
        except CustosError as e:
            self._entry_failed(entry, f"key {name} could not be certified by the AK", e)
            await self._delete_key(entry.key_custody, name)
            return None
        return _Prepared(entry, generation, key, csr, public, jwk, evidence)

    async def _receive(self, p: _Prepared, x: IssuedX509, w: IssuedWit) -> None:
        """Keep one generation when both credentials came, else delete its key."""
        try:
            for refusal in (x.error, w.error):
                if refusal is not None:
                    self._node.report_refused(refusal)
                    raise refusal
            problem = self._mismatch(p, x, w)
            if problem:
                raise CustosError(problem, code="workload_credentials_mismatch")
            now = self._now()
            not_after = min(x.expires_at, w.expires_at)
            issued = _Issued(
                p.entry,
                p.generation,
                p.key,
                x.cert_chain,
                w.wit,
                not_after,
                now,
                self._rotation_time(now, not_after),
            )
            # On disk first: a crash after this line restarts with this generation.
            await asyncio.to_thread(self._persist, issued)
        except CustosError as e:
            self._entry_failed(p.entry, "no credentials issued", e)
            await self._delete_key(p.entry.key_custody, p.key.name)
            return
        old = self._served.get(p.entry.id)
        self._served[p.entry.id] = issued
        self._retry.pop(p.entry.id, None)
        if old is not None:
            self._deletions[(old.entry.key_custody, old.key.name)] = old.not_after
        log.info(
            "credentials for %s (entry %s): generation %d, key %s in %s, valid %.0f s",
            p.entry.spiffe_id,
            p.entry.id,
            p.generation,
            p.key.name,
            p.entry.key_custody,
            issued.not_after - issued.issued_at,
        )

    @staticmethod
    def _mismatch(p: _Prepared, x: IssuedX509, w: IssuedWit) -> str:
        """Why the credentials do not fit the entry and key ("" when they do)."""
        if _uri_sans(x.cert_chain[0]) != [str(p.entry.spiffe_id)]:
            return "the X.509-SVID does not name the entry's SPIFFE ID"
        try:
            shape = parse_wit_unverified(w.wit, profile="spiffe")
        except CustosError as e:
            return f"the WIT is malformed: {e.message}"
        if str(shape.subject) != str(p.entry.spiffe_id):
            return "the WIT does not name the entry's SPIFFE ID"
        members = ("kty", "crv", "x", "y", "n", "e")
        if any(shape.cnf_jwk.get(m) != p.jwk.get(m) for m in members):
            return "the WIT binds another key than the one sent"
        return ""

    def _rotation_time(self, issued_at: float, not_after: float) -> float:
        half = (not_after - issued_at) / 2
        return issued_at + half * (1.0 + random.uniform(-self._jitter, self._jitter))

    def _entry_failed(self, entry: AgentEntry, what: str, error: CustosError) -> None:
        _, attempts = self._retry.get(entry.id, (0.0, 0))
        delay = self._backoff.delay(attempts)
        self._retry[entry.id] = (time.monotonic() + delay, attempts + 1)
        log.warning(
            "entry %s (%s): %s (%s: %s); trying again in %.1f s",
            entry.id,
            entry.spiffe_id,
            what,
            error.code,
            error.message,
            delay,
            extra={"code": error.code},
        )

    # ---- keys ----------------------------------------------------------------------------

    async def _delete_due(self, now: float) -> None:
        for (tier, name), when in sorted(self._deletions.items(), key=lambda kv: kv[1]):
            if when > now:
                continue
            if await self._delete_key(tier, name):
                del self._deletions[(tier, name)]
            else:
                self._deletions[(tier, name)] = now + self._backoff.maximum

    async def _delete_key(self, tier: str, name: str) -> bool:
        try:
            await self._custody.async_store_for(tier).delete(name)
        except KeyNotFoundError:
            pass
        except CustosError as e:
            log.warning(
                "could not delete workload key %s in %s: %s",
                name,
                tier,
                e.message,
                extra={"code": e.code},
            )
            return False
        log.debug("deleted workload key %s in %s", name, tier)
        return True

    async def _delete_orphans(self) -> None:
        """Delete the ``wl-*`` keys that no credential file names (see the module docstring)."""
        kept = {(i.entry.key_custody, i.key.name) for i in self._served.values()}
        for tier in sorted(self._custody.tiers):
            try:
                names = [k.name for k in await self._custody.async_store_for(tier).list()]
            except CustosError as e:
                log.warning(
                    "cannot list the %s key store: %s", tier, e.message, extra={"code": e.code}
                )
                continue
            for name in names:
                parsed = parse_key_name(name)
                if parsed is None or (tier, name) in kept:
                    continue
                entry_id, generation = parsed
                # Never reuse a generation number a key had (a failed delete keeps it).
                self._generations[entry_id] = max(self._generations.get(entry_id, 0), generation)
                log.info("deleting workload key %s in %s: no credentials name it", name, tier)
                if not await self._delete_key(tier, name):
                    self._deletions[(tier, name)] = self._now()

    # ---- persistence ---------------------------------------------------------------------

    def _path(self, entry_id: str) -> Path:
        return self._dir / f"{entry_id}.json"

    def _persist(self, issued: _Issued) -> None:
        e = issued.entry
        write_json_atomic(
            self._path(e.id),
            {
                "version": _STATE_VERSION,
                "entry": {
                    "id": e.id,
                    "spiffe_id": str(e.spiffe_id),
                    "parent_id": str(e.parent_id),
                    "selectors": [str(s) for s in e.selectors],
                    "x509_svid_ttl": e.x509_svid_ttl,
                    "jwt_svid_ttl": e.jwt_svid_ttl,
                    "wit_ttl": e.wit_ttl,
                    "dns_names": list(e.dns_names),
                    "key_custody": e.key_custody,
                    "hint": e.hint,
                    "admin": e.admin,
                    "downstream": e.downstream,
                    "expires_at": e.expires_at,
                    "revision": e.revision,
                },
                "generation": issued.generation,
                "key_name": issued.key.name,
                "tier": e.key_custody,
                "x509_svid_pem": "".join(
                    c.public_bytes(Encoding.PEM).decode("ascii") for c in issued.chain
                ),
                "wit": issued.wit,
                "not_after": issued.not_after,
                "issued_at": issued.issued_at,
            },
        )

    async def _restore(self) -> None:
        """Serve the credential files whose key exists, certifies it and is unexpired."""
        documents = await asyncio.to_thread(self._read_documents)
        now = self._now()
        for path, document in documents:
            try:
                issued = await self._issued_from(document, path.stem, now)
            except (CustosError, KeyError, TypeError, ValueError) as e:
                why = e.message if isinstance(e, CustosError) else f"malformed ({type(e).__name__})"
                log.warning(
                    "not using workload credentials %s: %s",
                    path,
                    why,
                    extra={"code": "workload_state_unusable"},
                )
                with contextlib.suppress(CustosError):
                    await asyncio.to_thread(remove_file, path)
                continue
            self._served[issued.entry.id] = issued
            log.info(
                "serving %s (entry %s, generation %d) from %s until %.0f s from now",
                issued.entry.spiffe_id,
                issued.entry.id,
                issued.generation,
                path,
                issued.not_after - now,
            )

    def _read_documents(self) -> list[tuple[Path, dict[str, Any] | None]]:
        return [(path, read_json(path)) for path in sorted(self._dir.glob("*.json"))]

    async def _issued_from(
        self, document: dict[str, Any] | None, entry_id: str, now: float
    ) -> _Issued:
        if document is None:
            raise CustosError("unreadable", code="workload_state_unusable")
        if document.get("version") != _STATE_VERSION:
            raise CustosError("unknown version", code="workload_state_unusable")
        entry = _entry_from_state(document["entry"])
        generation = document["generation"]
        if entry.id != entry_id or not isinstance(generation, int) or generation < 1:
            raise CustosError("names another entry", code="workload_state_unusable")
        self._generations[entry.id] = max(self._generations.get(entry.id, 0), generation)
        name = key_name(entry.id, generation)
        if document["key_name"] != name or document["tier"] != entry.key_custody:
            raise CustosError("names another key", code="workload_state_unusable")
        not_after = finite_number(document["not_after"], name="not_after")
        issued_at = finite_number(document["issued_at"], name="issued_at", maximum=not_after)
        if not_after <= now:
            raise CustosError("expired", code="workload_state_expired")
        chain = tuple(
            load_certificates(
                str(document["x509_svid_pem"]).encode("ascii"), what="workload X.509-SVID"
            )
        )
        wit = document["wit"]
        if not isinstance(wit, str) or not wit:
            raise CustosError("no WIT", code="workload_state_unusable")
        if not self._custody.offers(entry.key_custody):
            raise CustosError(
                f"this node no longer offers the {entry.key_custody!r} tier",
                code=REFUSED_TIER_MISSING,
            )
        facade = self._custody.async_store_for(entry.key_custody)
        key = StoreKey(facade.store, await facade.info(name))  # KeyNotFoundError: gone
        if _spki(await facade.public_key(name)) != _spki(chain[0].public_key()):
            raise CustosError(
                f"the X.509-SVID does not certify key {name}", code="workload_state_unusable"
            )
        if _uri_sans(chain[0]) != [str(entry.spiffe_id)]:
            raise CustosError(
                "the X.509-SVID names another SPIFFE ID", code="workload_state_unusable"
            )
        return _Issued(
            entry,
            generation,
            key,
            chain,
            wit,
            not_after,
            issued_at,
            self._rotation_time(issued_at, not_after),
        )

    # ---- publishing ----------------------------------------------------------------------

    def _publish(self) -> None:
        self.identities.publish(i.identity for i in self._served.values())

    # ---- following the server --------------------------------------------------------------

    def _entries_received(self, entry_set: EntrySet) -> None:
        usable: dict[str, AgentEntry] = {}
        for entry in entry_set.entries:
            if _ENTRY_ID.fullmatch(entry.id) is None:
                if self._refused_revisions.get(entry.id) != entry.revision:
                    self._refused_revisions[entry.id] = entry.revision
                    self.refused[REFUSED_ENTRY_ID] += 1
                    log.warning(
                        "entry id %r cannot name a key or a file: refused",
                        entry.id[:64],
                        extra={"code": REFUSED_ENTRY_ID},
                    )
                continue
            usable[entry.id] = entry
        self._entries = usable
        # A refusal is said once per revision of an entry that is still in the set.
        present = {entry.id for entry in entry_set.entries}
        for entry_id in [e for e in self._refused_revisions if e not in present]:
            del self._refused_revisions[entry_id]
        self._entry_sets += 1
        self.wake()

    async def _follow_entries(self) -> None:
        attempt = 0
        while True:
            try:
                async for entry_set in sync_entries(self._node.client):
                    attempt = 0
                    self._entries_received(entry_set)
            except AgentApiError as e:
                self._node.report_refused(e)
                log.log(
                    logging.INFO if e.retryable else logging.WARNING,
                    "entry stream ended (%s: %s); reconnecting",
                    e.code,
                    e.message,
                    extra={"code": e.code},
                )
            except CustosError as e:  # e.g. no node identity at this moment
                log.warning("entry stream: %s", e.message, extra={"code": e.code})
            raise_if_cancelling()  # a cancelled gRPC call may come back as an error
            delay = self._backoff.delay(attempt)
            attempt += 1
            seen = self._node.generation
            # A new node identity (a new client) is worth trying at once.
            await wait_at_most(self._node.wait_changed(seen), delay)

    async def _follow_bundle(self) -> None:
        seen = self._node.generation
        bundle = self._node.bundle
        while True:
            seen = await self._node.wait_changed(seen)
            with contextlib.suppress(CustosError):
                now = self._node.bundle
                if now != bundle:
                    bundle = now
                    self.identities.bump()


def _entry_from_state(data: Mapping[str, Any]) -> AgentEntry:
    """The entry as its file recorded it (raises KeyError/TypeError/ValueError/CustosError)."""
    expires_at = data["expires_at"]
    return AgentEntry(
        id=_text(data["id"]),
        spiffe_id=SpiffeId.parse(_text(data["spiffe_id"])),
        parent_id=SpiffeId.parse(_text(data["parent_id"])),
        selectors=tuple(sorted(Selector.parse(_text(s)) for s in _list(data["selectors"]))),
        x509_svid_ttl=finite_number(data["x509_svid_ttl"], name="x509_svid_ttl", minimum=1),
        jwt_svid_ttl=finite_number(data["jwt_svid_ttl"], name="jwt_svid_ttl", minimum=1),
        wit_ttl=finite_number(data["wit_ttl"], name="wit_ttl", minimum=1),
        dns_names=tuple(_text(d) for d in _list(data["dns_names"])),
        key_custody=_text(data["key_custody"]),
        hint=_text(data["hint"]),
        admin=data["admin"] is True,
        downstream=data["downstream"] is True,
        expires_at=None if expires_at is None else finite_number(expires_at, name="expires_at"),
        revision=int(finite_number(data["revision"], name="revision", minimum=0)),
    )


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("not a string")
    return value


def _list(value: object) -> Iterable[object]:
    if not isinstance(value, list):
        raise TypeError("not a list")
    return value


__all__ = [
    "KEY_ALGORITHM",
    "KEY_PREFIX",
    "MAX_BATCH",
    "REFUSED_ENTRY_ID",
    "REFUSED_TIER_MISSING",
    "Backoff",
    "WorkloadManager",
    "key_name",
    "parse_key_name",
]
