"""Node attestation: one ``AttestAgent`` stream driven against the catalog's server halves.

The order of one attestation (SPIRE's ``AttestAgent``, with custos's bounds):

1. the first message must be ``start``: a configured attestor's name, its payload, and
   the agent key's CSR and custody (every size bounded before anything else runs);
2. the CSR is parsed, its signature checked and its key held to the issuer's rules
   (:func:`custos.x509.ca.check_csr_key` and the agent-key algorithms a WIT-SVID takes)
   *before* the attestor runs, so a broken client cannot spend a single-use join token
   on a request that can never succeed;
3. the attestor's server half runs through :meth:`ServerCatalog.attest_node` (it stamps
   the selector types and builds the agent ID); its challenges go out as ``challenge``
   messages and the answers come back as ``challenge_response``;
4. a banned agent is refused; an agent that is attested (and not evicted) may attest
   again only through a re-attestable attestor (a join token is spent anyway);
5. the agent's X.509-SVID and WIT are issued and the agent is recorded (eviction
   cleared) in one worker-thread call, so a client hanging up cannot cut it in half;
   every write of the attestation — the credentials' audit rows, the signing keys'
   bookkeeping, the attestor's own deferred writes (the TPM clock row), the agent row
   and the attestation's audit row — is one unit of work, one commit (decision 0108);
6. the whole exchange runs under one deadline.

``RenewAgent`` (agents whose attestor cannot re-attest) issues the same way but records
through :meth:`AgentRepository.renewed`, which checks and writes in one transaction: an
eviction or ban that lands during the issuance refuses the renewal and is never undone.

Every refusal is a :class:`~custos.errors.CustosError` with a stable code; the Agent API
maps it to a gRPC status in one place (:mod:`custos.server.agent_api.status`): protocol
and argument errors derive from its ``AgentApiArgumentError`` (INVALID_ARGUMENT),
refusals from ``AgentApiForbiddenError`` (PERMISSION_DENIED); ``attestation_timeout``
(DEADLINE_EXCEEDED) and ``renew_by_attesting`` (FAILED_PRECONDITION) are mapped by code.
Nothing is written before step 5: writes an attestor asks for during step 3 (the
``tpm`` attestor's clock row) are checked then and written in step 5's unit of work, so a
refused attestation writes its refusal audit line and nothing else.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import grpc

from custos._numbers import seconds
from custos.bundle import TrustBundle
from custos.errors import CustosError
from custos.identity import Selector, SpiffeId
from custos.plugin.catalog import (
    MAX_ATTESTATION_MESSAGE_BYTES,
    AttestationExchangeError,
    NodeAttestationResult,
)
from custos.plugin.errors import PluginCallError, PluginMisbehavedError
from custos.server.agent_api.status import (
    AgentApiArgumentError,
    AgentApiBusyError,
    AgentApiForbiddenError,
    status_for,
)
from custos.server.datastore.database import DeferredWrites
from custos.server.datastore.errors import (
    DatastoreError,
    DatastoreUnavailableError,
    NotFoundError,
)
from custos.server.datastore.records import Agent
from custos.server.datastore.tpm_nodes import TpmClockRegressedError
from custos.server.issuer import (
    AgentCredentials,
    CustodyEvidence,
    ResidencyError,
    agent_key_alg,
    key_residency,
)
from custos.x509 import MAX_CSR_BYTES, CsrError, load_csr
from custos.x509.ca import check_csr_key

if TYPE_CHECKING:
    from custos._proto import agent_v1_pb2
    from custos.server.context import ServerContext

log = logging.getLogger(__name__)

#: The whole attestation, first message to result (a TPM needs well under a second;
#: a client that stalls longer only holds a stream open).
DEFAULT_DEADLINE = 30.0
#: Attestations one server runs at once (each holds a stream for up to the deadline;
#: real agents attest once per start or renewal).  More: RESOURCE_EXHAUSTED, retried.
MAX_PENDING_ATTESTATIONS = 256
#: A plugin name is a selector type: short.
MAX_ATTESTOR_NAME = 128
#: TPM2_Certify statements (issue 10) are a few hundred bytes.
MAX_CUSTODY_EVIDENCE_BYTES = MAX_ATTESTATION_MESSAGE_BYTES
#: The label of an attestor name that is not configured (metrics must not take
#: label values from a caller: each one would be a new time series).
UNKNOWN_ATTESTOR_LABEL = "unknown"
#: Statuses that mean the server failed (metrics outcome "error"), not the caller.
_SERVER_FAULTS = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE})


class AttestationError(CustosError):
    """Root of the node-attestation refusals."""

    code = "attestation_failed"


class AttestationProtocolError(AttestationError, AgentApiArgumentError):
    """The stream broke the exchange: no ``start`` first, a field missing or oversized,
    an answer where none was asked for, the stream ended early."""

    code = "attestation_protocol"


class UnknownAttestorError(AttestationError, AgentApiArgumentError):
    """The agent named a node attestor this server does not run."""

    code = "attestor_unknown"


class AttestationRefusedError(AttestationError, AgentApiForbiddenError):
    """The attestor refused the evidence (``code`` is the attestor's, e.g.
    ``join_token_used``), or the agent may not attest."""

    code = "attestation_refused"


class AgentBannedError(AttestationRefusedError):
    code = "agent_banned"


class AgentAlreadyAttestedError(AttestationRefusedError):
    """An attested, not evicted agent attested again through an attestor that cannot
    re-attest (it renews with ``RenewAgent``)."""

    code = "agent_already_attested"


class AttestationTimeoutError(AttestationError):
    """The attestation did not finish within its deadline (DEADLINE_EXCEEDED)."""

    code = "attestation_timeout"


class AttestorFailedError(AttestationError):
    """The attestor itself failed (a bug or an outage on the server's side; details in
    the log, not in the status)."""

    code = "attestor_failed"


class RenewalRefusedError(AttestationError):
    """``RenewAgent`` from an agent whose attestor can re-attest: it renews by
    attesting again."""

    code = "renew_by_attesting"


@dataclass(frozen=True)
class AttestedAgent:
    """What one successful attestation (or renewal) hands back to the agent."""

    agent_id: SpiffeId
    credentials: AgentCredentials
    selectors: tuple[Selector, ...]
    reattestable: bool
    bundle: TrustBundle


class AttestationStream(Protocol):
    """The transport of one ``AttestAgent`` call (the gRPC servicer adapts its context)."""

    async def receive(self) -> agent_v1_pb2.AttestAgentRequest | None:
        """The next request; ``None`` once the client has closed its side."""
        ...

    async def send_challenge(self, data: bytes) -> None: ...


def _bounded(data: bytes, what: str, limit: int) -> bytes:
    if len(data) > limit:
        raise AttestationProtocolError(f"{what} is {len(data)} bytes; at most {limit}")
    return data


def key_request(key: agent_v1_pb2.AgentKeyRequest) -> tuple[bytes, CustodyEvidence]:
    """The CSR (parsed; its signature checked: proof of possession; its key one the
    issuer takes for an agent) and the custody evidence of an ``AgentKeyRequest``;
    only the CSR's public key is ever used."""
    csr = _bounded(key.csr, "key.csr", MAX_CSR_BYTES)
    if not csr:
        raise AttestationProtocolError("key.csr is missing")
    info = _bounded(key.custody.tpm_certify_info, "tpm_certify_info", MAX_CUSTODY_EVIDENCE_BYTES)
    signature = _bounded(
        key.custody.tpm_certify_signature, "tpm_certify_signature", MAX_CUSTODY_EVIDENCE_BYTES
    )
    try:
        parsed = load_csr(csr)
        valid = parsed.is_signature_valid
    except (CsrError, ValueError, TypeError) as e:
        raise AttestationProtocolError("key.csr is not a PKCS#10 CSR", code="invalid_csr") from e
    if not valid:
        raise AttestationProtocolError(
            "key.csr signature does not verify (no proof of possession)", code="invalid_csr"
        )
    # The issuer's own key rules, applied here so a key it would refuse (P-521, RSA
    # under 2048 bits; Ed25519, which no WIT-SVID takes) never spends a join token.
    try:
        public = parsed.public_key()
        check_csr_key(public)
    except CsrError as e:
        raise AttestationProtocolError(e.message, code="invalid_csr") from e
    except (ValueError, TypeError) as e:  # a key cryptography cannot load
        raise AttestationProtocolError("key.csr holds no usable key", code="invalid_csr") from e
    # The issuer's one rule for agent keys (kept there, not copied here).
    agent_key_alg(public, parsed.signature_algorithm_parameters)
    tpm_public = _bounded(key.custody.tpm_public, "tpm_public", MAX_CUSTODY_EVIDENCE_BYTES)
    custody = CustodyEvidence(
        tier=key.custody.tier,
        tpm_certify_info=info,
        tpm_certify_signature=signature,
        tpm_public=tpm_public,
    )
    custody.check()  # the issuer's own rule, applied before a join token is spent
    return csr, custody


def agent_key_residency(attestation_key: bytes, csr: bytes, custody: CustodyEvidence) -> str:
    """The residency of the agent's own key (:func:`custos.server.issuer.key_residency`
    for the CSR's key). An agent whose node has an attestation key and says its key
    is in the TPM must prove it: evidence missing (``residency_unproven``) or invalid
    (the code of :mod:`custos.tpm.verify`) refuses the attestation (decision 0063)."""
    try:
        residency = key_residency(attestation_key, custody, load_csr(csr).public_key())
    except ResidencyError as e:
        raise AttestationRefusedError(e.message, code=e.code) from e
    if attestation_key and custody.tier == "tpm" and residency != "proven":
        raise AttestationRefusedError(
            "the agent key's custody is 'tpm' but no TPM2_Certify by the node's "
            "attestation key came with it",
            code="residency_unproven",
        )
    return residency


def _refusal(error: PluginCallError) -> AttestationError | CustosError:
    """What the agent is told when the attestor raised (the cause is logged in full)."""
    cause = error.__cause__
    if isinstance(cause, DatastoreUnavailableError):
        return cause  # the database is away: UNAVAILABLE, try again later
    if isinstance(error, PluginMisbehavedError) or not isinstance(cause, CustosError):
        return AttestorFailedError(f"node attestor {error.plugin!r} failed")
    # The attestor's own refusal (spent token, bad evidence): its code and message,
    # which attestors write for the agent (join_token never repeats the secret).
    return AttestationRefusedError(f"{error.plugin}: {cause.message}", code=cause.code)


class NodeAttestation:
    """Runs ``AttestAgent`` calls and ``RenewAgent`` issuance for one server."""

    def __init__(
        self,
        ctx: ServerContext,
        *,
        deadline: float = DEFAULT_DEADLINE,
        max_pending: int = MAX_PENDING_ATTESTATIONS,
    ) -> None:
        self._ctx = ctx
        self._deadline = seconds(deadline, name="attestation deadline", minimum=0.001)
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError("max_pending must be a positive int")
        self._max_pending = max_pending
        self._pending = 0

    def _label(self, name: str) -> str:
        return name if name in self._ctx.catalog.node_attestors else UNKNOWN_ATTESTOR_LABEL

    async def run(self, stream: AttestationStream) -> AttestedAgent:
        """One attestation, start to result, under the deadline; counted by outcome."""
        name = ""
        outcome = "error"
        # AttestAgent is the one unauthenticated call: bound how many streams it holds.
        if self._pending >= self._max_pending:
            self._ctx.metrics.attestations.labels(
                attestor=UNKNOWN_ATTESTOR_LABEL, outcome="refused"
            ).inc()
            raise AgentApiBusyError(
                f"more than {self._max_pending} attestations are in progress; try again later"
            )
        self._pending += 1
        try:
            try:
                # The deadline bounds the exchange, not the issuance after it: once the
                # server has decided, issuing and recording finish as one unit.
                async with asyncio.timeout(self._deadline):
                    start = await stream.receive()
                    if start is None or start.WhichOneof("step") != "start":
                        raise AttestationProtocolError("the first message must be 'start'")
                    name = start.start.attestor
                    decided = await self._decide(start.start, stream)
            except TimeoutError:
                raise AttestationTimeoutError(
                    f"the attestation took longer than {self._deadline:g} s"
                ) from None
            except AttestationExchangeError as e:
                raise AttestationProtocolError(e.message, code=e.code) from e
            result = await self._issue(*decided)
            outcome = "ok"
            return result
        except CustosError as e:
            # The caller's fault (protocol, evidence, ban, deadline) or the server's.
            outcome = "error" if status_for(e) in _SERVER_FAULTS else "refused"
            if outcome == "refused":
                # The audit trail has every refused attestation, not only the log of the
                # attestor's reason: attempts with forged or replayed evidence show there.
                self._ctx.auditor.refused(
                    event="attestation", identity="", code=e.code, attestor=self._label(name)
                )
            raise
        finally:
            self._pending -= 1
            self._ctx.metrics.attestations.labels(attestor=self._label(name), outcome=outcome).inc()

    async def _decide(
        self, start: agent_v1_pb2.AttestationStart, stream: AttestationStream
    ) -> tuple[NodeAttestationResult, bytes, CustodyEvidence, str, DeferredWrites]:
        """Everything before the first write: bounds, CSR, the attestor (its writes
        collected, not made), ban and re-attestation checks."""
        name = start.attestor
        if not name or len(name) > MAX_ATTESTOR_NAME:
            raise AttestationProtocolError(
                f"start.attestor must be 1 to {MAX_ATTESTOR_NAME} characters"
            )
        attestor = self._ctx.catalog.node_attestors.get(name)
        if attestor is None:
            raise UnknownAttestorError(f"no node attestor named {name!r} is configured here")
        payload = _bounded(start.payload, "start.payload", MAX_ATTESTATION_MESSAGE_BYTES)
        if not payload:
            raise AttestationProtocolError("start.payload is empty")
        csr, custody = key_request(start.key)

        async def challenge(data: bytes) -> bytes:
            await stream.send_challenge(data)
            reply = await stream.receive()
            if reply is None:
                raise AttestationProtocolError("the stream ended while a challenge was open")
            if reply.WhichOneof("step") != "challenge_response":
                raise AttestationProtocolError("expected 'challenge_response' after a challenge")
            return _bounded(
                reply.challenge_response, "challenge_response", MAX_ATTESTATION_MESSAGE_BYTES
            )

        try:
            # The attestor's writes (the tpm clock row) wait for the issuance's unit of
            # work: checked now, written with the rest or not at all (decision 0108).
            with self._ctx.datastore.deferring_writes() as writes:
                node = await self._ctx.catalog.attest_node(name, payload, challenge)
        except PluginCallError as e:
            refusal = _refusal(e)
            if isinstance(refusal, AttestorFailedError):
                # A bug or an outage of the plugin: the traceback is for the operator.
                log.error("node attestor %r failed", name, exc_info=e)
            else:
                log.info("node attestation with %r refused: %s", name, e.__cause__ or e)
            raise refusal from e
        # Checked after the attestor (the agent ID and attestation key come from it)
        # and before any write; one worker-thread call (a signature check, a read).
        residency, existing = await asyncio.to_thread(self._residency_and_agent, node, csr, custody)
        if existing is not None:
            if existing.banned:
                raise AgentBannedError(f"agent {node.agent_id} is banned")
            if not existing.evicted and not node.can_reattest:
                raise AgentAlreadyAttestedError(
                    f"agent {node.agent_id} is already attested and {name!r} cannot "
                    "re-attest; renew with RenewAgent"
                )
        return node, csr, custody, residency, writes

    async def _issue(
        self,
        node: NodeAttestationResult,
        csr: bytes,
        custody: CustodyEvidence,
        residency: str,
        writes: DeferredWrites,
    ) -> AttestedAgent:
        credentials, bundle = await asyncio.to_thread(
            self._issue_and_record,
            node.agent_id,
            csr,
            custody,
            node.plugin,
            node.selectors,
            residency=residency,
            attestation_key=node.attestation_key,
            writes=writes,
        )
        return AttestedAgent(
            agent_id=node.agent_id,
            credentials=credentials,
            selectors=node.selectors,
            reattestable=node.can_reattest,
            bundle=bundle,
        )

    def _residency_and_agent(
        self, node: NodeAttestationResult, csr: bytes, custody: CustodyEvidence
    ) -> tuple[str, Agent | None]:
        residency = agent_key_residency(node.attestation_key, csr, custody)
        return residency, self._agent(node.agent_id)

    def _agent(self, agent_id: SpiffeId) -> Agent | None:
        try:
            return self._ctx.datastore.agents.get(agent_id)
        except NotFoundError:
            return None

    def _issue_and_record(
        self,
        agent_id: SpiffeId,
        csr: bytes,
        custody: CustodyEvidence,
        attestor: str,
        selectors: tuple[Selector, ...],
        *,
        residency: str,
        attestation_key: bytes = b"",
        renewal: bool = False,
        writes: DeferredWrites | None = None,
    ) -> tuple[AgentCredentials, TrustBundle]:
        """Issue the agent's credentials, record the agent, audit: one thread call, so
        a cancelled stream cannot leave credentials issued without the agent recorded,
        and one unit of work with the issuance's own writes (decision 0108). Also the
        trust bundle to send with them (read after the issuance; datastore reads, kept
        off the event loop)."""

        def record(credentials: AgentCredentials) -> None:
            if writes is not None:
                try:
                    writes.run()
                except TpmClockRegressedError as e:
                    # Another server accepted a later quote of this TPM meanwhile.
                    raise AttestationRefusedError(f"{attestor}: {e.message}", code=e.code) from e
            self._record(
                credentials,
                agent_id,
                custody,
                attestor,
                selectors,
                residency=residency,
                attestation_key=attestation_key,
                renewal=renewal,
            )

        credentials = self._ctx.issuer.agent_credentials(
            agent_id,
            csr,
            custody,
            attestor=attestor,
            selectors=selectors,
            residency=residency,
            record=record,
        )
        return credentials, self._ctx.bundle()

    def _record(
        self,
        credentials: AgentCredentials,
        agent_id: SpiffeId,
        custody: CustodyEvidence,
        attestor: str,
        selectors: tuple[Selector, ...],
        *,
        residency: str,
        attestation_key: bytes,
        renewal: bool,
    ) -> None:
        """The agent row and the attestation's audit row (inside the issuance's unit)."""
        serial = format(credentials.x509_svid.leaf.serial_number, "x")
        agents = self._ctx.datastore.agents
        try:
            if renewal:
                # Checked and written in one transaction: an eviction (or ban) that
                # landed while the credentials were issued refuses the renewal and
                # stays; the credentials just issued are dropped, never returned.
                agents.renewed(agent_id, serial=serial, expires_at=credentials.not_after)
            else:
                agents.attested(
                    agent_id,
                    attestor=attestor,
                    selectors=selectors,
                    serial=serial,
                    expires_at=credentials.not_after,
                    attestation_key=attestation_key,
                )
        except DatastoreError as e:
            if e.code == "agent_banned":  # banned while we were issuing
                raise AgentBannedError(f"agent {agent_id} is banned") from e
            if e.code == "agent_evicted":
                raise AttestationRefusedError(
                    f"agent {agent_id} was evicted; it must attest again", code="agent_evicted"
                ) from e
            raise
        self._ctx.auditor.record(
            event="agent-renewal" if renewal else "attestation",
            who=str(agent_id),
            attestor=attestor,
            selectors=selectors,
            identity=str(agent_id),
            serial_or_jti=serial,
            not_after=credentials.not_after,
            custody=custody.tier,
            residency=residency,
        )

    async def renew(self, agent: Agent, key: agent_v1_pb2.AgentKeyRequest) -> AttestedAgent:
        """New credentials for an authenticated agent whose attestor cannot re-attest."""
        attestor = self._ctx.catalog.node_attestors.get(agent.attestor)
        if attestor is not None and attestor.supports_reattestation:
            raise RenewalRefusedError(
                f"agents attested with {agent.attestor!r} renew by attesting again"
            )
        csr, custody = key_request(key)
        residency = agent_key_residency(agent.attestation_key, csr, custody)
        credentials, bundle = await asyncio.to_thread(
            self._issue_and_record,
            agent.id,
            csr,
            custody,
            agent.attestor,
            agent.selectors,
            residency=residency,
            renewal=True,
        )
        return AttestedAgent(
            agent_id=agent.id,
            credentials=credentials,
            selectors=agent.selectors,
            reattestable=False,
            bundle=bundle,
        )


__all__ = [
    "DEFAULT_DEADLINE",
    "MAX_PENDING_ATTESTATIONS",
    "AgentAlreadyAttestedError",
    "AgentBannedError",
    "AttestationError",
    "AttestationProtocolError",
    "AttestationRefusedError",
    "AttestationStream",
    "AttestationTimeoutError",
    "AttestedAgent",
    "AttestorFailedError",
    "NodeAttestation",
    "RenewalRefusedError",
    "UnknownAttestorError",
    "agent_key_residency",
    "key_request",
]
