"""What the Workload API serves from: the node's workload identities, now.

:class:`WorkloadIdentity` is one registration entry's current credentials (an
X.509-SVID chain and a WIT, both for one key in the entry's custody tier).
:class:`IdentitySource` is the narrow interface the Workload API reads;
:class:`WorkloadIdentities` implements it.  :mod:`custos.agent.workloads` publishes
into it (:meth:`WorkloadIdentities.publish`), each publication replacing the whole
set and moving :attr:`~WorkloadIdentities.generation`, so a streaming call sends the
full set again (SPIFFE Workload API: full-set updates).

- ``identities_for(selectors)``: the identities whose entry selectors are *all* among
  the caller's, ordered by entry id (the first is the default identity, SPIFFE
  Workload API §8).  Credentials past their ``not_after`` are never handed out, even
  between two publications.
- ``jwt_svid(identity, audience)``: a JWT-SVID from the server (``NewJWTSVID``),
  cached per (entry, SPIFFE ID, audience set) until half its lifetime has passed, in
  a bounded LRU cache; concurrent requests for the same token share one call.
- ``bundle()``: the trust domain's bundle as the node last received it.

Private key bytes: only an ``exportable`` identity gives them out
(:meth:`WorkloadIdentity.private_key_pkcs8`, :meth:`WorkloadIdentity.private_jwk`);
every other tier raises :class:`~custos.keys.ExportRefusedError` (DESIGN decision 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from custos.agent.client.errors import AgentApiError
from custos.bundle import TrustBundle
from custos.identity import Selector, SpiffeId
from custos.keys import ExportableKeyStore, ExportRefusedError, StoreKey
from custos.keys.errors import UnsupportedAlgorithmError
from custos.keys.jwk import b64url, public_jwk

if TYPE_CHECKING:
    from custos.agent.client.calls import AgentApiClient

#: JWT-SVIDs kept (per entry and audience set); the least recently used go first.
DEFAULT_JWT_CACHE_SIZE = 1024


@dataclass(frozen=True, eq=False)
class WorkloadIdentity:
    """One entry's current credentials; ``key`` signs for both (one key per generation)."""

    entry_id: str
    spiffe_id: SpiffeId
    hint: str
    custody: str  # tpm | pkcs11 | memory | exportable
    selectors: tuple[Selector, ...]
    x509_svid: tuple[x509.Certificate, ...]  # leaf first (+ intermediates)
    wit: str
    key: StoreKey
    not_after: float  # the earlier expiry of the two credentials

    def _exportable_store(self) -> ExportableKeyStore:
        store = self.key.store
        if self.custody != "exportable" or not isinstance(store, ExportableKeyStore):
            raise ExportRefusedError(
                f"the key of {self.spiffe_id} is held in the {self.custody!r} tier and "
                "never leaves it (only 'exportable' identities give out their key)"
            )
        return store

    def private_key_pkcs8(self) -> bytes:
        """The private key as PKCS#8 DER (``x509_svid_key``); ``exportable`` only."""
        return self._exportable_store().export_private_key_der(self.key.name)

    def private_jwk(self) -> dict[str, str]:
        """The private key as a JWK with ``alg`` and ``kid`` (``wit_svid_key``);
        ``exportable`` only."""
        private = self._exportable_store().export_private_key(self.key.name)
        jwk: dict[str, str] = dict(public_jwk(private.public_key(), self.key.alg))
        if isinstance(private, ec.EllipticCurvePrivateKey):
            size = (private.curve.key_size + 7) // 8
            jwk["d"] = b64url(private.private_numbers().private_value.to_bytes(size, "big"))
        elif isinstance(private, rsa.RSAPrivateKey):
            n = private.private_numbers()
            for member, value in (
                ("d", n.d),
                ("p", n.p),
                ("q", n.q),
                ("dp", n.dmp1),
                ("dq", n.dmq1),
                ("qi", n.iqmp),
            ):
                jwk[member] = b64url(value.to_bytes((value.bit_length() + 7) // 8 or 1, "big"))
        else:  # WIT-SVIDs take no EdDSA key, and custos makes workload keys ES256
            raise UnsupportedAlgorithmError(f"no private JWK for a {self.key.alg.value} key")
        return jwk


class NodeLink(Protocol):
    """What the workload side needs from the agent's own identity
    (:class:`custos.agent.node.NodeIdentity` is one)."""

    @property
    def client(self) -> AgentApiClient: ...

    @property
    def bundle(self) -> TrustBundle: ...

    @property
    def generation(self) -> int: ...

    async def wait_changed(self, seen: int) -> int: ...

    def report_refused(self, error: AgentApiError) -> None: ...


class IdentitySource(Protocol):
    """What the Workload API serves from (see the module docstring)."""

    @property
    def generation(self) -> int: ...

    async def wait_changed(self, seen: int) -> int: ...

    def identities_for(self, selectors: Collection[Selector]) -> list[WorkloadIdentity]: ...

    def bundle(self) -> TrustBundle: ...

    async def jwt_svid(self, identity: WorkloadIdentity, audience: Sequence[str]) -> str: ...


class ChangeCounter:
    """A generation number that moves on every change, and a way to wait for the
    next one (each waiter wakes once the number differs from what it saw)."""

    def __init__(self) -> None:
        self.value = 0
        self._changed = asyncio.Event()

    def bump(self) -> int:
        self.value += 1
        # A fresh event per generation: every waiter of this one wakes.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        return self.value

    async def wait_changed(self, seen: int) -> int:
        while self.value == seen:
            await self._changed.wait()
        return self.value


@dataclass(frozen=True)
class Backoff:
    """Jittered exponential backoff: ``initial`` seconds, doubling up to ``maximum``,
    each delay drawn from [50 %, 100 %] of that so agents do not retry in step.
    Shared by the node identity and the workload credentials."""

    initial: float = 1.0
    maximum: float = 60.0

    def delay(self, attempt: int) -> float:
        return min(self.maximum, self.initial * 2.0 ** min(attempt, 30)) * random.uniform(0.5, 1.0)


#: The backoff the agent's parts use unless a test gives a faster one.
DEFAULT_BACKOFF = Backoff()


async def wait_at_most(aw: Awaitable[object], timeout: float) -> None:
    """Wait for ``aw``, at most ``timeout`` seconds (no error when the time is up).
    ``asyncio.timeout``, not ``wait_for``: on Python 3.11 ``wait_for`` can swallow a
    cancellation that arrives as ``aw`` completes, and a ``stop()`` that cancels the
    waiting loop would then wait for ever."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await aw


def raise_if_cancelling() -> None:
    """Re-raise a cancellation of this task that a library turned into an error
    (a cancelled gRPC call can come back as ``CANCELLED``)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


@dataclass(frozen=True)
class _Indexed:
    identity: WorkloadIdentity
    selectors: frozenset[Selector]


@dataclass(frozen=True)
class _CachedJwt:
    token: str
    refresh_at: float
    expires_at: float


_JwtKey = tuple[str, str, tuple[str, ...]]


class WorkloadIdentities:
    """The :class:`IdentitySource` of the agent.  ``node`` gives the Agent API client
    and the bundle; ``now`` is the clock (tests inject one)."""

    def __init__(
        self,
        node: NodeLink,
        *,
        now: Callable[[], float] = time.time,
        jwt_cache_size: int = DEFAULT_JWT_CACHE_SIZE,
    ) -> None:
        if jwt_cache_size < 1:
            raise ValueError("jwt_cache_size must be at least 1")
        self._node = node
        self._now = now
        self._indexed: tuple[_Indexed, ...] = ()
        self._changes = ChangeCounter()
        self._jwts: OrderedDict[_JwtKey, _CachedJwt] = OrderedDict()
        self._jwt_cache_size = jwt_cache_size
        self._inflight: dict[_JwtKey, asyncio.Future[_CachedJwt]] = {}

    # ---- IdentitySource ----------------------------------------------------------------

    @property
    def generation(self) -> int:
        return self._changes.value

    async def wait_changed(self, seen: int) -> int:
        """Wait until :attr:`generation` differs from ``seen``; return it."""
        return await self._changes.wait_changed(seen)

    def identities_for(self, selectors: Collection[Selector]) -> list[WorkloadIdentity]:
        caller = selectors if isinstance(selectors, frozenset | set) else frozenset(selectors)
        now = self._now()
        # self._indexed is kept in entry id order.
        return [
            i.identity
            for i in self._indexed
            if i.selectors <= caller and i.identity.not_after > now
        ]

    def all(self) -> list[WorkloadIdentity]:
        """Every identity served now (unexpired), by entry id."""
        now = self._now()
        return [i.identity for i in self._indexed if i.identity.not_after > now]

    def bundle(self) -> TrustBundle:
        return self._node.bundle

    async def jwt_svid(self, identity: WorkloadIdentity, audience: Sequence[str]) -> str:
        """A JWT-SVID for ``identity`` and ``audience`` (cached until half its life);
        a refusal is the server's :class:`~custos.agent.client.errors.AgentApiError`."""
        values = (audience,) if isinstance(audience, str) else tuple(audience)
        key: _JwtKey = (identity.entry_id, str(identity.spiffe_id), tuple(sorted(set(values))))
        cached = self._jwts.get(key)
        if cached is not None and cached.refresh_at > self._now():
            self._jwts.move_to_end(key)
            return cached.token
        pending = self._inflight.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._fetch_jwt(identity.entry_id, key))
            self._inflight[key] = pending
            pending.add_done_callback(lambda done: self._fetched(key, done))
        # shield: one caller giving up must not cancel the call the others wait for.
        return (await asyncio.shield(pending)).token

    def _fetched(self, key: _JwtKey, done: asyncio.Future[_CachedJwt]) -> None:
        self._inflight.pop(key, None)
        if not done.cancelled():
            # Retrieved here too: when every caller gave up, nobody else reads a refusal.
            done.exception()

    async def _fetch_jwt(self, entry_id: str, key: _JwtKey) -> _CachedJwt:
        try:
            issued = await self._node.client.new_jwt_svid(entry_id, list(key[2]))
        except AgentApiError as e:
            self._node.report_refused(e)
            raise
        now = self._now()
        cached = _CachedJwt(issued.token, now + (issued.expires_at - now) / 2, issued.expires_at)
        self._jwts[key] = cached
        self._jwts.move_to_end(key)
        while len(self._jwts) > self._jwt_cache_size:
            self._jwts.popitem(last=False)
        return cached

    # ---- the publishing side (custos.agent.workloads) ------------------------------------

    def publish(self, identities: Iterable[WorkloadIdentity]) -> None:
        """Replace the whole set and move the generation."""
        ordered = sorted(identities, key=lambda i: i.entry_id)
        self._indexed = tuple(_Indexed(i, frozenset(i.selectors)) for i in ordered)
        served = {(i.entry_id, str(i.spiffe_id)) for i in ordered}
        for key in [k for k in self._jwts if (k[0], k[1]) not in served]:
            del self._jwts[key]
        self.bump()

    def bump(self) -> None:
        """Move the generation (something served changed: the bundle, an expiry)."""
        self._changes.bump()


__all__ = [
    "DEFAULT_BACKOFF",
    "DEFAULT_JWT_CACHE_SIZE",
    "Backoff",
    "ChangeCounter",
    "IdentitySource",
    "NodeLink",
    "WorkloadIdentities",
    "WorkloadIdentity",
    "raise_if_cancelling",
    "wait_at_most",
]
