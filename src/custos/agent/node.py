"""The agent's own identity: attest once, keep it, renew it, re-attest when told.

:class:`NodeIdentity` holds the agent's X.509-SVID and WIT (their key in the
configured custody tier's store, named ``custos-agent-<generation>``) and the
:class:`~custos.agent.client.calls.AgentApiClient` every authenticated call uses.

- **Start**: the identity persisted in ``data_dir/agent.json`` is used again when
  its key still exists, its chain verifies against the persisted bundle and it has
  not expired: a restarted agent serves without attesting (a join token is spent
  after one use, so it could not).  Otherwise the node attestor attests, over a
  channel that trusts the configured bundle file (or, loudly, the insecure
  bootstrap pin).  Keys named ``custos-agent-*`` that the state does not name are
  deleted (a ``kill -9`` between key creation and persistence).
- **Renewal** at half the lifetime (±jitter): a fresh key each time, by
  ``RenewAgent`` (or ``AttestAgent`` again when the attestor re-attests); the old
  key is deleted only after the new identity is on disk.
- **Re-attestation** when the server says the agent is unknown, evicted or its WIT
  superseded (``agent_not_found``, ``agent_evicted``, ``agent_wit_superseded``).
- **Server down** (``UNAVAILABLE``): retries with jittered exponential backoff,
  keeping the current identity until it expires.
- **Bundle**: follows ``StreamBundle``; persisted on change, and when the X.509
  roots change the channel is re-opened with the new roots.

A refusal that no retry can cure (a banned agent; re-attestation refused, e.g. a
spent join token) is :attr:`NodeIdentity.failure`: logged once, and the agent
stops (:meth:`NodeIdentity.wait_failed`).  Decision 0048 has the reasons.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from grpclib.client import Channel
from grpclib.const import Status

from custos._files import UnreadableFileError, read_small_file
from custos._proto import agent_v1_pb2, types_v1_pb2
from custos.agent.client.attest import AgentIdentity, attest_agent, identity_from_proto, renew_agent
from custos.agent.client.calls import AgentApiClient
from custos.agent.client.channel import (
    DEFAULT_SERVER_NAME,
    open_channel,
    open_insecure_bootstrap_channel,
)
from custos.agent.client.errors import AgentApiError
from custos.agent.client.streams import stream_bundle
from custos.agent.identities import DEFAULT_BACKOFF, Backoff, raise_if_cancelling, wait_at_most
from custos.agent.residency import KeyResidency
from custos.agent.state import ensure_private_dir, read_json, write_json_atomic
from custos.bundle import BundleError, TrustBundle
from custos.errors import CustosError
from custos.identity import TrustDomain
from custos.keys import KeyStore, StoreKey
from custos.plugin.catalog import LoadedAgentNodeAttestor
from custos.wimse.wit import verify_wit
from custos.x509 import CertificateFormatError, load_certificates

log = logging.getLogger(__name__)

#: The agent's own keys are ``custos-agent-<generation>`` in its custody tier's store.
AGENT_KEY_PREFIX = "custos-agent-"
_AGENT_KEY = re.compile(re.escape(AGENT_KEY_PREFIX) + r"([0-9]{1,18})")
STATE_FILE = "agent.json"
_STATE_VERSION = 1
#: Server codes that mean "this identity is no longer good: attest again".
REATTEST_CODES = frozenset({"agent_evicted", "agent_not_found", "agent_wit_superseded"})
_BANNED = "agent_banned"
#: The server's answer to RenewAgent from an agent whose attestor re-attests.
_RENEW_BY_ATTESTING = "renew_by_attesting"
#: Statuses after which trying again later may work (beyond AgentApiError.retryable):
#: a server-side fault or a response we could not use.
_RETRY_STATUSES = frozenset({Status.INTERNAL, Status.UNKNOWN})
#: How long an old channel stays open after a new one replaced it (calls in flight end).
CHANNEL_GRACE = 30.0
#: The largest bundle file read at start.
_MAX_BUNDLE_FILE = 1 << 20


class NodeIdentityError(CustosError):
    """The agent could not get (or keep) its own identity."""

    code = "node_identity"


@dataclass(frozen=True)
class ServerConnection:
    """How the agent reaches the server: ``address`` (``host:port``), the DNS name in
    the server's certificate, and what it trusts before its first attestation."""

    address: str
    server_name: str = DEFAULT_SERVER_NAME
    bundle_file: Path | None = None
    insecure_bootstrap: bool = False


def load_bootstrap_bundle(path: Path, trust_domain: TrustDomain) -> TrustBundle:
    """The bundle file of ``[server] bundle_file``: a SPIFFE bundle (JSON) or the
    X.509 roots as PEM (SPIRE's ``trust_bundle_path``)."""
    try:
        data = read_small_file(path, max_bytes=_MAX_BUNDLE_FILE, what="bundle file")
        if data.lstrip().startswith(b"-----BEGIN"):
            roots = load_certificates(data, what=f"bundle file {str(path)!r}")
            return TrustBundle(trust_domain, x509_authorities=roots)
        return TrustBundle.from_spiffe_json(trust_domain, data)
    except (UnreadableFileError, CertificateFormatError, BundleError) as e:
        raise NodeIdentityError(f"server.bundle_file: {e.message}", code=e.code) from e


@dataclass(frozen=True)
class _Held:
    """The identity in use and everything that goes with it (replaced as one)."""

    identity: AgentIdentity
    key: StoreKey
    generation: int
    issued_at: float  # when it arrived (local clock): the CA backdates not_before


class NodeIdentity:
    """The agent's own identity (see the module docstring).

    ``store`` is the custody tier's key store (the caller owns and closes it);
    ``now`` is the clock for renewal times (tests may inject one);
    ``start_timeout`` bounds how long :meth:`start` retries an unreachable server
    before it gives up with a clear error.
    """

    def __init__(
        self,
        *,
        trust_domain: TrustDomain,
        server: ServerConnection,
        attestor: LoadedAgentNodeAttestor,
        store: KeyStore,
        custody: str,
        data_dir: Path,
        jitter: float = 0.1,
        backoff: Backoff = DEFAULT_BACKOFF,
        start_timeout: float = 60.0,
        now: Callable[[], float] = time.time,
    ) -> None:
        if not 0.0 <= jitter < 1.0:
            raise NodeIdentityError(f"jitter must be in [0, 1), not {jitter!r}")
        self._td = trust_domain
        self._server = server
        self._attestor = attestor
        # A TPM attestor certifies the agent's tpm-custody key with its AK.
        self._residency = KeyResidency.of(attestor)
        self._store = store
        self._custody = custody
        self._data_dir = data_dir
        self._state_path = data_dir / STATE_FILE
        self._jitter = jitter
        self._backoff = backoff
        self._start_timeout = start_timeout
        self._now = now
        self._held: _Held | None = None
        self._channel: Channel | None = None
        self._channel_roots: frozenset[Any] = frozenset()
        # One writer of the state file at a time (a bundle update and a renewal could
        # otherwise write in either order and leave the older identity on disk).
        self._state_lock = asyncio.Lock()
        self._client: AgentApiClient | None = None
        self._generation = 0
        self._changed = asyncio.Event()
        self._wake = asyncio.Event()
        self._reattest_reason: str | None = None
        self._failure: NodeIdentityError | None = None
        self._failed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing: dict[Channel, asyncio.Task[None]] = {}
        self._renew_at = 0.0

    # ---- what other parts use ----------------------------------------------------------

    @property
    def client(self) -> AgentApiClient:
        """The client for authenticated calls; a new object after every renewal,
        re-attestation or channel change: read it for each call or stream."""
        if self._client is None:
            raise NodeIdentityError("the agent has no identity yet (start() first)")
        return self._client

    @property
    def identity(self) -> AgentIdentity:
        if self._held is None:
            raise NodeIdentityError("the agent has no identity yet (start() first)")
        return self._held.identity

    @property
    def bundle(self) -> TrustBundle:
        """The trust domain's bundle as last received from the server."""
        return self.identity.bundle

    @property
    def residency(self) -> KeyResidency:
        """Certify evidence from the node attestor (for workload keys too)."""
        return self._residency

    @property
    def key_name(self) -> str:
        return self._key_name(self._require().generation)

    @property
    def generation(self) -> int:
        """Moves on every change: renewal, re-attestation, bundle, failure."""
        return self._generation

    async def wait_changed(self, seen: int) -> int:
        while self._generation == seen:
            await self._changed.wait()
        return self._generation

    @property
    def failure(self) -> NodeIdentityError | None:
        """Why the agent lost its identity for good, or ``None``."""
        return self._failure

    async def wait_failed(self) -> NodeIdentityError:
        await self._failed.wait()
        assert self._failure is not None
        return self._failure

    def report_refused(self, error: AgentApiError) -> None:
        """Tell the node identity that the server refused a call with ``error``: an
        unknown, evicted or superseded agent attests again, a banned one has failed
        (other codes: no-op)."""
        if error.code in REATTEST_CODES:
            self._request_reattest(error)
        elif error.code == _BANNED:
            self._banned(error)

    # ---- start and stop ----------------------------------------------------------------

    async def start(self) -> None:
        """Use the persisted identity or attest (bounded retries while the server is
        unreachable), then keep it fresh in the background."""
        try:
            await self._start()
        except BaseException:
            await self.stop()  # a channel opened before the failure is closed
            raise

    async def _start(self) -> None:
        await asyncio.to_thread(ensure_private_dir, self._data_dir)
        held = await asyncio.to_thread(self._restore)
        await asyncio.to_thread(self._delete_stale_keys, held)
        if held is not None:
            log.info(
                "agent identity %s restored from %s (expires in %.0f s); not attesting again",
                held.identity.spiffe_id,
                self._state_path,
                held.identity.expires_at - self._now(),
            )
            self._install(held)
            if self._residency.certifies and held.identity.reattestable:
                await self._attest_at_start()
        else:
            try:
                async with asyncio.timeout(self._start_timeout):
                    await self._first_attestation()
            except TimeoutError:
                raise NodeIdentityError(
                    f"could not reach the server at {self._server.address} to attest "
                    f"within {self._start_timeout:.0f} s",
                    code="node_attestation_unavailable",
                ) from None
        self._tasks = [
            asyncio.create_task(self._maintain(), name="custos-node-renewal"),
            asyncio.create_task(self._follow_bundle(), name="custos-node-bundle"),
        ]

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        closing, self._closing = self._closing, {}
        for task in [*tasks, *closing.values()]:
            task.cancel()
        for task in [*tasks, *closing.values()]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        # Replaced channels still in their grace period close now, with the current one.
        for channel in [*closing, self._channel]:
            if channel is not None:
                channel.close()
        self._channel = None

    async def __aenter__(self) -> NodeIdentity:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- persistence -------------------------------------------------------------------

    @staticmethod
    def _key_name(generation: int) -> str:
        return f"{AGENT_KEY_PREFIX}{generation}"

    def _require(self) -> _Held:
        if self._held is None:
            raise NodeIdentityError("the agent has no identity yet (start() first)")
        return self._held

    def _persist(self, held: _Held) -> None:
        identity = held.identity
        write_json_atomic(
            self._state_path,
            {
                "version": _STATE_VERSION,
                "trust_domain": self._td.name,
                "spiffe_id": str(identity.spiffe_id),
                "generation": held.generation,
                "custody": self._custody,
                "x509_svid": "".join(
                    c.public_bytes(Encoding.PEM).decode("ascii") for c in identity.x509_svid
                ),
                "wit": identity.wit,
                "bundle": identity.bundle.to_spiffe_json(),
                "selectors": [str(s) for s in identity.selectors],
                "expires_at": identity.expires_at,
                "issued_at": held.issued_at,
                "reattestable": identity.reattestable,
            },
        )

    def _restore(self) -> _Held | None:
        """The persisted identity when it is still usable, else ``None`` (logged)."""
        state = read_json(self._state_path)
        if state is None:
            return None
        try:
            held = self._held_from_state(state)
        except (CustosError, KeyError, TypeError, ValueError) as e:
            message = e.message if isinstance(e, CustosError) else f"{type(e).__name__}: {e}"
            log.warning(
                "not using the persisted agent identity in %s: %s; attesting again",
                self._state_path,
                message,
                extra={"code": "agent_state_unusable"},
            )
            return None
        return held

    def _held_from_state(self, state: dict[str, Any]) -> _Held:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unknown state version {state.get('version')!r:.20}")
        if state["trust_domain"] != self._td.name:
            raise ValueError(f"it is for trust domain {state['trust_domain']!r:.80}")
        if state["custody"] != self._custody:
            raise ValueError(f"its key is in the {state['custody']!r:.20} tier, not the configured")
        generation = state["generation"]
        if not isinstance(generation, int) or isinstance(generation, bool) or generation < 1:
            raise ValueError("its generation is not a positive integer")
        expires_at, issued_at = float(state["expires_at"]), float(state["issued_at"])
        if expires_at <= self._now():
            raise ValueError("the identity has expired")
        chain = load_certificates(_text(state, "x509_svid").encode("ascii"), what="agent SVID")
        bundle = TrustBundle.from_spiffe_json(self._td, _text(state, "bundle"))
        selectors = state["selectors"]
        if not isinstance(selectors, list):
            raise ValueError("selectors is not a list")
        message = agent_v1_pb2.AgentIdentity(
            spiffe_id=_text(state, "spiffe_id"),
            x509_svid=b"".join(c.public_bytes(Encoding.DER) for c in chain),
            wit=_text(state, "wit"),
            bundle=types_v1_pb2.Bundle(
                trust_domain=self._td.name, spiffe_bundle=bundle.to_spiffe_json()
            ),
            selectors=[str(s) for s in selectors],
            expires_at=int(expires_at),
            reattestable=bool(state["reattestable"]),
        )
        key = self._store.get(self._key_name(generation))  # KeyNotFoundError: gone
        # The same checks as a fresh answer from the server: the leaf certifies this
        # key, the chain verifies against the bundle (and is not expired).
        identity = replace(identity_from_proto(message, key), expires_at=expires_at)
        _check_wit(identity, key)
        return _Held(identity, key, generation, issued_at)

    def _agent_key_generations(self) -> list[int]:
        return [
            int(m.group(1))
            for info in self._store.list()
            if (m := _AGENT_KEY.fullmatch(info.name)) is not None
        ]

    def _delete_stale_keys(self, keep: _Held | None) -> None:
        """Delete agent keys no persisted identity names (left by a crash)."""
        for generation in self._agent_key_generations():
            if keep is not None and generation == keep.generation:
                continue
            self._delete_key(self._key_name(generation), "not named by the persisted identity")

    def _delete_key(self, name: str, why: str) -> None:
        try:
            self._store.delete(name)
            log.info("deleted agent key %s (%s)", name, why)
        except CustosError as e:
            log.warning("could not delete agent key %s: %s", name, e.message)

    def _new_key(self, generation: int) -> StoreKey:
        name = self._key_name(generation)
        self._store.create(name, "ES256")
        return self._store.get(name)

    def _next_generation(self) -> int:
        known = self._agent_key_generations()
        if self._held is not None:
            known.append(self._held.generation)
        return max(known, default=0) + 1

    # ---- channels ----------------------------------------------------------------------

    def _verified_channel(self, bundle: TrustBundle) -> Channel:
        return open_channel(
            self._server.address, bundle=bundle, server_name=self._server.server_name
        )

    async def _bootstrap_channel(self) -> Channel:
        if self._server.bundle_file is not None:
            bundle = await asyncio.to_thread(
                load_bootstrap_bundle, self._server.bundle_file, self._td
            )
            return self._verified_channel(bundle)
        if not self._server.insecure_bootstrap:
            raise NodeIdentityError(
                "the agent has no identity and nothing to trust the server with: set "
                "server.bundle_file (or server.insecure_bootstrap for development)",
                code="node_no_bundle",
            )
        return await open_insecure_bootstrap_channel(
            self._server.address, server_name=self._server.server_name
        )

    def _install(self, held: _Held) -> None:
        """Make ``held`` current and tell waiters; a channel that trusts its bundle's
        X.509 roots replaces the current one when those roots changed (a CA rotation)."""
        roots = frozenset(held.identity.bundle.x509_authorities)
        if self._channel is None or roots != self._channel_roots:
            old, self._channel = self._channel, self._verified_channel(held.identity.bundle)
            self._channel_roots = roots
            if old is not None:
                self._close_later(old)
        self._held = held
        self._client = AgentApiClient(self._channel, held.identity, held.key)
        self._renew_at = self._renewal_time(held)
        self._bump()

    def _close_later(self, channel: Channel) -> None:
        async def close() -> None:
            # grpclib closes at once: calls in flight get the grace period first.
            try:
                await asyncio.sleep(CHANNEL_GRACE)
            finally:
                channel.close()
                self._closing.pop(channel, None)

        self._closing[channel] = asyncio.create_task(close(), name="custos-node-old-channel")

    def _bump(self) -> None:
        self._generation += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _renewal_time(self, held: _Held) -> float:
        half = max(0.0, held.identity.expires_at - held.issued_at) / 2
        return held.issued_at + half * (1 + random.uniform(-self._jitter, self._jitter))

    # ---- attestation and renewal -------------------------------------------------------

    async def _first_attestation(self) -> None:
        attempt = 0
        while True:
            channel = await self._bootstrap_channel_or_retry(attempt)
            if channel is None:
                attempt += 1
                continue
            try:
                await self._attest(channel)
            except AgentApiError as e:
                channel.close()
                raise_if_cancelling()
                if not _worth_retrying(e):
                    raise NodeIdentityError(
                        f"node attestation refused by the server: [{e.code}] {e.message}",
                        code=e.code,
                    ) from e
                delay = self._backoff.delay(attempt)
                log.warning(
                    "node attestation failed (%s: %s); retrying in %.1f s",
                    e.code,
                    e.message,
                    delay,
                )
                attempt += 1
                await asyncio.sleep(delay)
                continue
            except BaseException:
                channel.close()
                raise
            channel.close()  # _keep opened a channel that trusts the new bundle
            return

    async def _attest_at_start(self) -> None:
        """A restored identity on a TPM-attested node: attest again now, so that the
        server holds the AK this process certifies keys with (and sees fresh PCRs).
        On failure the restored identity serves while the background retries."""
        try:
            async with asyncio.timeout(self._start_timeout):
                await self._attest(self._channel_for_attestation())
        except (AgentApiError, CustosError, TimeoutError) as e:
            raise_if_cancelling()
            why = e.message if isinstance(e, CustosError) else "timed out"
            code = e.code if isinstance(e, CustosError) else "timeout"
            log.warning(
                "could not attest again at start (%s: %s); serving the restored identity "
                "and retrying in the background",
                code,
                why,
            )
            self._reattest_reason = f"[{code}] {why}"

    async def _bootstrap_channel_or_retry(self, attempt: int) -> Channel | None:
        try:
            return await self._bootstrap_channel()
        except AgentApiError as e:  # the TOFU fetch could not reach the server
            raise_if_cancelling()
            delay = self._backoff.delay(attempt)
            log.warning("cannot reach the server (%s); retrying in %.1f s", e.message, delay)
            await asyncio.sleep(delay)
            return None

    async def _attest(self, channel: Channel) -> _Held:
        """Attest with a fresh key; persist; delete the previous key."""
        generation = await asyncio.to_thread(self._next_generation)
        key = await asyncio.to_thread(self._new_key, generation)
        try:
            identity = await attest_agent(
                channel,
                attestor=self._attestor,
                key=key,
                custody=self._custody,
                residency=self._residency,
            )
        except BaseException:
            await asyncio.to_thread(self._delete_key, key.name, "its attestation failed")
            raise
        log.info(
            "node attested as %s (key %s, expires in %.0f s)",
            identity.spiffe_id,
            key.name,
            identity.expires_at - self._now(),
        )
        return await self._keep(identity, key, generation)

    async def _renew(self) -> _Held:
        held = self._require()
        generation = await asyncio.to_thread(self._next_generation)
        key = await asyncio.to_thread(self._new_key, generation)
        try:
            identity = await renew_agent(self.client, key, self._custody, residency=self._residency)
        except BaseException:
            await asyncio.to_thread(self._delete_key, key.name, "its renewal failed")
            raise
        if identity.spiffe_id != held.identity.spiffe_id:
            await asyncio.to_thread(self._delete_key, key.name, "the renewal named another agent")
            raise NodeIdentityError(
                f"the server renewed {held.identity.spiffe_id} as {identity.spiffe_id}",
                code="node_renewal_mismatch",
            )
        log.info(
            "agent identity renewed (key %s, expires in %.0f s)",
            key.name,
            identity.expires_at - self._now(),
        )
        return await self._keep(identity, key, generation)

    async def _keep(self, identity: AgentIdentity, key: StoreKey, generation: int) -> _Held:
        """Persist the new identity and make it current, then (and only then) delete
        the previous key."""
        held = _Held(identity, key, generation, self._now())
        async with self._state_lock:
            try:
                await asyncio.to_thread(self._persist, held)
            except BaseException:
                await asyncio.to_thread(
                    self._delete_key, key.name, "its identity was not persisted"
                )
                raise
            previous = self._held
            self._install(held)
            if previous is not None and previous.generation != generation:
                await asyncio.to_thread(
                    self._delete_key, self._key_name(previous.generation), "replaced"
                )
        return held

    def _request_reattest(self, error: AgentApiError) -> None:
        if self._reattest_reason is None:
            log.warning(
                "the server no longer accepts this agent's identity (%s: %s); attesting again",
                error.code,
                error.message,
            )
            self._reattest_reason = f"[{error.code}] {error.message}"
        self._wake.set()

    def _banned(self, error: AgentApiError) -> None:
        self._fail(
            NodeIdentityError(
                f"agent {self.identity.spiffe_id} is banned and can never attest again "
                f"under this ID: [{error.code}] {error.message}",
                code=error.code,
            )
        )

    def _fail(self, error: NodeIdentityError) -> None:
        if self._failure is None:
            log.error("%s", error.message, extra={"code": error.code})
            self._failure = error
            self._failed.set()
            self._bump()

    async def _maintain(self) -> None:
        """Renew at the renewal time, re-attest when asked; back off on failures."""
        attempt = 0
        while self._failure is None:
            due = self._renew_at - self._now()
            if self._reattest_reason is None and due > 0:
                self._wake.clear()
                await wait_at_most(self._wake.wait(), due)
                continue
            reattest = self._reattest_reason is not None or self._must_attest()
            try:
                if reattest:
                    await self._attest(self._channel_for_attestation())
                else:
                    await self._renew()
            except AgentApiError as e:
                raise_if_cancelling()  # a cancelled gRPC call may come back as an error
                attempt = await self._after_refusal(e, reattest, attempt)
                continue
            except NodeIdentityError as e:
                self._fail(e)
                return
            except CustosError as e:  # a device or disk fault: try again later
                raise_if_cancelling()
                attempt = await self._retry_later(e.code, e.message, attempt)
                continue
            except Exception as e:  # a bug must not silently end renewals: log, retry
                raise_if_cancelling()
                log.exception("renewing the agent identity failed unexpectedly")
                attempt = await self._retry_later("internal", type(e).__name__, attempt)
                continue
            attempt = 0
            self._reattest_reason = None

    def _must_attest(self) -> bool:
        held = self._require()
        # RenewAgent needs a valid WIT: an expired identity can only attest again.
        return held.identity.reattestable or held.identity.expires_at <= self._now()

    def _channel_for_attestation(self) -> Channel:
        assert self._channel is not None
        return self._channel

    async def _after_refusal(self, e: AgentApiError, reattested: bool, attempt: int) -> int:
        if e.code == _RENEW_BY_ATTESTING:
            held = self._require()
            self._held = replace(held, identity=replace(held.identity, reattestable=True))
            return attempt
        if e.code in REATTEST_CODES and not reattested:
            self._request_reattest(e)
            return attempt
        if _worth_retrying(e):
            return await self._retry_later(e.code, e.message, attempt)
        held = self._require()
        if reattested:
            why = self._reattest_reason or "its identity expired"
            hint = (
                ""
                if held.identity.reattestable
                else " (a join token works once: give the agent a new one and restart it)"
            )
            self._fail(
                NodeIdentityError(
                    f"agent {held.identity.spiffe_id} must attest again ({why}) but the "
                    f"server refused the attestation: [{e.code}] {e.message}{hint}",
                    code=e.code,
                )
            )
        else:
            self._fail(
                NodeIdentityError(
                    f"the server refused to renew agent {held.identity.spiffe_id}: "
                    f"[{e.code}] {e.message}",
                    code=e.code,
                )
            )
        return attempt

    async def _retry_later(self, code: str, message: str, attempt: int) -> int:
        delay = self._backoff.delay(attempt)
        held = self._require()
        left = held.identity.expires_at - self._now()
        log.warning(
            "could not renew the agent identity (%s: %s); retrying in %.1f s (%s)",
            code,
            message,
            delay,
            f"current identity valid {left:.0f} s more" if left > 0 else "current identity EXPIRED",
        )
        if self._reattest_reason is None:  # a re-attestation asked for meanwhile goes first
            self._wake.clear()
        await wait_at_most(self._wake.wait(), delay)
        return attempt + 1

    # ---- the bundle stream -------------------------------------------------------------

    async def _follow_bundle(self) -> None:
        attempt = 0
        while self._failure is None:
            client = self.client
            try:
                async for bundle in stream_bundle(client):
                    attempt = 0
                    await self._bundle_received(bundle)
            except AgentApiError as e:
                raise_if_cancelling()  # a cancelled gRPC call may come back as an error
                if self._client is not client:
                    continue  # the identity or channel changed under the stream: reopen now
                if e.code in REATTEST_CODES:
                    self._request_reattest(e)
                    await self.wait_changed(self._generation)
                    continue
                if e.code == _BANNED:
                    self._banned(e)
                    return
                delay = self._backoff.delay(attempt)
                attempt += 1
                log.info(
                    "bundle stream ended (%s: %s); reconnecting in %.1f s", e.code, e.message, delay
                )
                await asyncio.sleep(delay)

    async def _bundle_received(self, bundle: TrustBundle) -> None:
        async with self._state_lock:
            held = self._require()
            current = held.identity.bundle
            if set(bundle.x509_authorities) == set(current.x509_authorities) and set(
                bundle.jwt_authorities
            ) == set(current.jwt_authorities):
                return
            updated = replace(held, identity=replace(held.identity, bundle=bundle))
            await asyncio.to_thread(self._persist, updated)
            log.info(
                "trust bundle updated (%d X.509 roots, %d JWT keys)",
                len(bundle.x509_authorities),
                len(bundle.jwt_authorities),
            )
            renew_at = self._renew_at  # only the bundle changed: keep the renewal time
            self._install(updated)
            self._renew_at = renew_at


def _text(state: dict[str, Any], name: str) -> str:
    value = state[name]
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} is not a non-empty string")
    return value


def _spki(key: Any) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)  # type: ignore[no-any-return]


def _check_wit(identity: AgentIdentity, key: StoreKey) -> None:
    """The persisted WIT verifies against the bundle, names the agent and binds its key
    (the server would refuse it otherwise, and a restart must not serve on it)."""
    verified = verify_wit(identity.wit, identity.bundle, profile="spiffe")
    if verified.subject != identity.spiffe_id:
        raise ValueError("the WIT names another subject than the SVID")
    if _spki(verified.cnf_public_key) != _spki(key.public_key()):
        raise ValueError("the WIT binds another key than the agent's")


def _worth_retrying(error: AgentApiError) -> bool:
    return error.retryable or error.status in _RETRY_STATUSES


__all__ = [
    "AGENT_KEY_PREFIX",
    "CHANNEL_GRACE",
    "REATTEST_CODES",
    "STATE_FILE",
    "Backoff",
    "NodeIdentity",
    "NodeIdentityError",
    "ServerConnection",
    "load_bootstrap_bundle",
]
