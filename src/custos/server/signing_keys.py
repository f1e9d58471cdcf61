"""The server's signing keys (issue 8, "Running it"): one :class:`SigningKeys`
per purpose (``x509-ca``, ``jwt-svid``, ``wit``).

Keys live in the configured key store under generated names
(``<key_name>-<kid prefix>``); the datastore holds only their metadata.  A new
key is *published* (in the bundle, not signing) by :meth:`SigningKeys.prepare`,
becomes the signer by :meth:`SigningKeys.activate` only after it has been
published for ``propagation_delay``, and the key it replaces is *retired*: it
stays in the bundle until the last credential it signed has expired, then
:meth:`SigningKeys.prune` removes it from datastore and key store.  Decision 0031.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from custos._numbers import finite_number, seconds
from custos.bundle import USE_JWT_SVID, USE_WIT_SVID, JwtAuthority, TrustBundle
from custos.errors import CustosError
from custos.identity import TrustDomain
from custos.keys import Algorithm, KeyNotFoundError, KeyStore, StoreKey
from custos.keys.base import check_key_name
from custos.server.datastore.signing_keys import PURPOSES, SigningKeyRecord
from custos.server.datastore.store import Datastore
from custos.x509.ca import CertificateAuthority

log = logging.getLogger(__name__)

#: How long a new key is in the bundle before it signs: SPIRE's default bundle
#: refresh hint and custos's default JWT-SVID TTL (5 min), so relying parties
#: polling the bundle have the key before the first credential it signs.
DEFAULT_PROPAGATION_DELAY = timedelta(minutes=5)
#: The ``use`` each JWT purpose publishes its keys under.
_USES = {"jwt-svid": USE_JWT_SVID, "wit": USE_WIT_SVID}
#: Key names are at most 128 characters; the suffix takes 17.
_MAX_PREFIX = 128 - 17


class SigningKeyError(CustosError):
    """A signing key cannot be used: missing from the key store, none active, ..."""

    code = "signing_key_error"


@dataclass(frozen=True)
class SigningKey:
    """One key: its metadata and a handle on it in the key store (no key material)."""

    record: SigningKeyRecord
    key: StoreKey
    trust_domain: TrustDomain

    @property
    def kid(self) -> str:
        return self.record.kid

    def certificate(self) -> x509.Certificate:
        """The CA certificate of an ``x509-ca`` key (self-signed root, or intermediate)."""
        return self.chain()[0]

    def chain(self) -> tuple[x509.Certificate, ...]:
        """The key's CA certificate and those above it up to the root: just the root
        for a self-signed CA, the intermediate then the upstream chain under one."""
        if self.record.certificate is None:
            raise SigningKeyError(f"signing key {self.kid} has no CA certificate")
        return tuple(x509.load_pem_x509_certificates(self.record.certificate.encode("ascii")))

    def ca(self) -> CertificateAuthority:
        """The CA signing with this key (``x509-ca`` keys)."""
        return CertificateAuthority(_ca_key(self.key), self.chain(), self.trust_domain)


class SigningKeys:
    """Rotation of one purpose's keys across every server sharing the datastore."""

    def __init__(
        self,
        datastore: Datastore,
        key_store: KeyStore,
        purpose: str,
        *,
        key_name: str,
        alg: Algorithm | str = Algorithm.ES256,
        propagation_delay: timedelta | float = DEFAULT_PROPAGATION_DELAY,
        ca_ttl: timedelta = timedelta(hours=24),
        rotation_period: timedelta | float | None = None,
        upstream: CertificateAuthority | None = None,
    ) -> None:
        if purpose not in PURPOSES:
            raise SigningKeyError(
                f"unknown signing-key purpose {purpose!r:.40}; use one of " + ", ".join(PURPOSES),
                code="signing_key_purpose",
            )
        self.purpose = purpose
        self.datastore = datastore
        self.key_store = key_store
        self.key_name = check_key_name(key_name)[:_MAX_PREFIX]
        self.alg = Algorithm.parse(alg)
        if purpose == "x509-ca" and self.alg is Algorithm.EdDSA:
            # X.509 SVID verifiers (Go crypto/x509 in SPIRE) take ECDSA and RSA CAs only.
            raise SigningKeyError(
                "a CA key must be ECDSA or RSA, not EdDSA", code="signing_key_alg"
            )
        self.propagation_delay = seconds(propagation_delay, name="propagation_delay")
        self.ca_ttl = timedelta(seconds=seconds(ca_ttl, name="ca_ttl", minimum=1.0))
        #: How long a key signs before the scheduled :meth:`rotate` replaces it
        #: (default: the CA TTL, so a CA key is replaced before its root expires).
        self.rotation_period = seconds(
            ca_ttl if rotation_period is None else rotation_period,
            name="rotation_period",
            minimum=1.0,
        )
        #: An upstream CA (``x509-ca``): each key's certificate is an intermediate it
        #: signs, and the bundle publishes the upstream root instead.
        self.upstream = upstream
        self._repo = datastore.signing_keys

    # -- state changes ------------------------------------------------------

    def prepare(self, *, now: float | None = None) -> SigningKey:
        """Make and publish the next key (in the bundle, not signing yet).

        When a key is already published (by this or another server) it is
        returned instead: there is at most one next key.
        """
        at = _now(now)
        made: list[str] = []
        with self._cleanup(made):
            record, created = self._repo.publish(self.purpose, self._maker(at, made))
        if created:
            log.info("published new %s signing key %s", self.purpose, record.kid)
        return self._key(record)

    def activate(self, *, now: float | None = None) -> SigningKey | None:
        """Make the published key the signer once it has been published for
        ``propagation_delay``; None when no key is due."""
        at = _now(now)
        record = self._repo.activate(
            self.purpose, published_before=at - self.propagation_delay, now=at
        )
        if record is None:
            return None
        log.info("activated %s signing key %s", self.purpose, record.kid)
        return self._key(record)

    def rotate(self, *, now: float | None = None) -> SigningKey:
        """One scheduled step (run it every minute or so on every server).

        SPIRE's schedule: the next key is prepared when the active one is half
        way through ``rotation_period`` and activated at five sixths of it
        (and never before it has been published for ``propagation_delay``);
        a first key on a fresh datastore; then pruning.  Returns the key that
        signs now.
        """
        at = _now(now)
        active = self.ensure_active(now=at)
        age = at - (active.record.active_from or at)
        if age >= self.rotation_period / 2:
            self.prepare(now=at)
        if age >= self.rotation_period * 5 / 6:
            self.activate(now=at)
        self.prune(now=at)
        return self.current()

    def rotate_now(self, *, now: float | None = None) -> SigningKey:
        """Activate a new key at once (``custos server rotate-keys``): the
        published one if any, else a fresh one.

        The new key signs before relying parties can have fetched it: credentials
        it signs fail verification until they refresh the bundle.  Logged as such.
        """
        record = self._activate_now(_now(now), first=False)
        log.warning(
            "forced rotation: %s signing key %s signs now, without the %.0f s "
            "propagation delay; relying parties with an older bundle reject its "
            "credentials until they refresh",
            self.purpose,
            record.kid,
            self.propagation_delay,
        )
        return self._key(record)

    def ensure_active(self, *, now: float | None = None) -> SigningKey:
        """The active key; on a fresh datastore the first key, active at once
        (nothing was signed before it, so no relying party needs it earlier)."""
        return self._key(self._activate_now(_now(now), first=True))

    def _activate_now(self, at: float, *, first: bool) -> SigningKeyRecord:
        made: list[str] = []
        with self._cleanup(made):
            record, created = self._repo.activate_now(
                self.purpose, self._maker(at, made), now=at, first=first
            )
        if created or not first:
            log.info("activated %s signing key %s", self.purpose, record.kid)
        return record

    def _maker(self, at: float, made: list[str]) -> Callable[[], SigningKeyRecord]:
        """Makes a key in the key store and its record (status ``published``)."""

        def make() -> SigningKeyRecord:
            kid = uuid.uuid4().hex
            name = f"{self.key_name}-{kid[:16]}"
            info = self.key_store.create(name, self.alg)
            made.append(name)
            return SigningKeyRecord(
                kid=kid,
                purpose=self.purpose,
                key_name=name,
                alg=info.alg.value,
                status="published",
                created_at=at,
                published_at=at,
                certificate=self._root_pem(name, at),
            )

        return make

    @contextmanager
    def _cleanup(self, made: list[str]) -> Iterator[None]:
        """When the metadata was not written, delete the keys made for it: no orphans."""
        try:
            yield
        except BaseException:
            for name in made:
                self.key_store.delete(name)
            raise

    def note_issued(self, kid: str, not_after: float | datetime) -> None:
        """Record that ``kid`` signed a credential valid until ``not_after``."""
        value = not_after.timestamp() if isinstance(not_after, datetime) else not_after
        self._repo.note_issued(kid, finite_number(value, name="not_after"))

    def prune(self, *, now: float | None = None) -> list[str]:
        """Remove retired keys whose credentials have all expired (and that were
        retired at least ``propagation_delay`` ago, for servers still signing
        with a key they read before it retired); returns their kids."""
        at = _now(now)
        removed = self._repo.remove_expired(
            self.purpose, retired_before=at - self.propagation_delay, now=at
        )
        for record in removed:
            try:
                self.key_store.delete(record.key_name)
            except KeyNotFoundError:
                pass  # already gone: the goal of pruning
            log.info("pruned retired %s signing key %s", self.purpose, record.kid)
        return [r.kid for r in removed]

    # -- reading ------------------------------------------------------------

    def current(self) -> SigningKey:
        """The key that signs now."""
        for record in self._repo.of_purpose(self.purpose):
            if record.status == "active":
                return self._key(record)
        raise SigningKeyError(f"no active {self.purpose} signing key", code="no_active_signing_key")

    def records(self) -> tuple[SigningKeyRecord, ...]:
        """What the datastore holds of every key in the bundle now, oldest first (one
        read, no key store access)."""
        return tuple(self._repo.of_purpose(self.purpose))

    def keys(self, records: Sequence[SigningKeyRecord] | None = None) -> list[SigningKey]:
        """Every key in the bundle: published, active and retired, oldest first (of
        ``records`` when given: what :meth:`records` read)."""
        return [self._key(r) for r in (self.records() if records is None else records)]

    def jwt_authorities(
        self, records: Sequence[SigningKeyRecord] | None = None
    ) -> tuple[JwtAuthority, ...]:
        use = _USES.get(self.purpose)
        if use is None:
            return ()
        return tuple(
            JwtAuthority(k.kid, k.key.public_key(), use=use, alg=k.record.alg)  # type: ignore[arg-type]
            for k in self.keys(records)
        )

    def x509_authorities(
        self, records: Sequence[SigningKeyRecord] | None = None
    ) -> tuple[x509.Certificate, ...]:
        if self.purpose != "x509-ca":
            return ()
        # The top of each chain: a key's own root, or the upstream root (once).
        return tuple(k.chain()[-1] for k in self.keys(records))

    def bundle(self, records: Sequence[SigningKeyRecord] | None = None) -> TrustBundle:
        """This purpose's part of the bundle (of ``records`` when given)."""
        return TrustBundle(
            self.datastore.trust_domain,
            x509_authorities=self.x509_authorities(records),
            jwt_authorities=self.jwt_authorities(records),
        )

    # -- helpers ------------------------------------------------------------

    def _key(self, record: SigningKeyRecord) -> SigningKey:
        try:
            handle = self.key_store.get(record.key_name)
        except KeyNotFoundError:
            raise SigningKeyError(
                f"{self.purpose} signing key {record.kid} ({record.status}) is missing "
                f"from the {self.key_store.kind} key store (key name "
                f"{record.key_name!r}): it was deleted outside custos; restore it, or "
                "replace an active key with SigningKeys.rotate_now()",
                code="signing_key_missing",
            ) from None
        return SigningKey(record, handle, self.datastore.trust_domain)

    def _root_pem(self, name: str, at: float) -> str | None:
        if self.purpose != "x509-ca":
            return None
        key, when = _ca_key(self.key_store.get(name)), datetime.fromtimestamp(at, UTC)
        td = self.datastore.trust_domain
        if self.upstream is None:
            ca = CertificateAuthority.self_signed(key, td, ttl=self.ca_ttl, now=when)
        else:
            ca = CertificateAuthority.intermediate(key, td, self.upstream, self.ca_ttl, now=when)
        return "".join(c.public_bytes(Encoding.PEM).decode("ascii") for c in ca.chain)


def trust_bundle(trust_domain: TrustDomain, *managers: SigningKeys) -> TrustBundle:
    """The trust domain's bundle from every purpose's keys."""
    return TrustBundle(
        trust_domain,
        x509_authorities=tuple(c for m in managers for c in m.x509_authorities()),
        jwt_authorities=tuple(a for m in managers for a in m.jwt_authorities()),
    )


def _ca_key(key: StoreKey) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    private = key.private_key()
    if not isinstance(private, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise SigningKeyError(
            f"a CA key must be ECDSA or RSA, not {key.alg.value}", code="signing_key_alg"
        )
    return private


def _now(now: float | None) -> float:
    return time.time() if now is None else finite_number(now, name="now")
