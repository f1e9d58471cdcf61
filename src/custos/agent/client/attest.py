"""The agent side of node attestation: ``AttestAgent`` and ``RenewAgent``.

The agent's identity key stays in its store (TPM, PKCS#11, memory): the store signs
a PKCS#10 CSR, the proof of possession the server checks before it issues anything;
only the CSR's public key is used.  The node attestor's agent half (loaded through
the agent's :class:`~custos.plugin.catalog.AgentCatalog`) makes the payload and
answers the server's challenges; this module carries them over the stream.

What comes back is checked before it is trusted: the X.509-SVID must certify *this*
key, carry the SPIFFE ID the server named, and chain to the bundle that came with it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from grpclib.client import Channel, Stream
from grpclib.exceptions import ProtocolError, StreamTerminatedError
from h2.exceptions import H2Error

from custos._proto import agent_v1_grpc, agent_v1_pb2, types_v1_pb2
from custos.agent.client.errors import (
    CALL_ERRORS,
    InvalidServerResponseError,
    own_task,
    run_call,
    translated,
)
from custos.agent.residency import CertifyEvidence, KeyResidency
from custos.bundle import BundleError, BundleSet, TrustBundle
from custos.errors import CustosError
from custos.identity import Selector, SpiffeId
from custos.keys import StoreKey
from custos.plugin.catalog import LoadedAgentNodeAttestor
from custos.x509 import CertificateFormatError, X509SvidError, verify_x509_svid

if TYPE_CHECKING:
    from custos.agent.client.calls import AgentApiClient

SERVICE = "custos.agent.v1.Attestation"
#: The whole attestation, as the server bounds it (its deadline is 30 s).
DEFAULT_TIMEOUT = 60.0
#: Key custody tiers (issue 8, "Registration entries").
CUSTODY_TIERS = ("tpm", "pkcs11", "memory", "exportable")
#: Algorithms of an agent identity key (its WIT-SVID excludes EdDSA).
AGENT_KEY_ALGORITHMS = ("ES256", "ES384", "RS256", "PS256")
#: Certificates in one SVID chain (leaf and intermediates).
MAX_CHAIN_CERTIFICATES = 16


#: After the result, how long the agent waits for the server to end the call (its
#: status) once it has half-closed; the result is kept whatever happens then.
END_WAIT = 5.0


@dataclass(frozen=True)
class AgentIdentity:
    """The agent's own identity: its SPIFFE ID, X.509-SVID chain (leaf first) and WIT
    for its key, the trust bundle, its node selectors and when the SVID expires."""

    spiffe_id: SpiffeId
    x509_svid: tuple[x509.Certificate, ...]
    wit: str
    bundle: TrustBundle
    selectors: tuple[Selector, ...]
    expires_at: float
    reattestable: bool


def der_chain(data: bytes) -> tuple[x509.Certificate, ...]:
    """Certificates given as concatenated DER (the wire's ``x509_svid`` form)."""
    certs: list[x509.Certificate] = []
    at = 0
    while at < len(data):
        if len(certs) == MAX_CHAIN_CERTIFICATES:
            raise InvalidServerResponseError(f"more than {MAX_CHAIN_CERTIFICATES} certificates")
        end = at + _der_length(data, at)
        try:
            certs.append(x509.load_der_x509_certificate(data[at:end]))
        except ValueError as e:
            raise InvalidServerResponseError(f"malformed certificate in the chain: {e}") from e
        at = end
    if not certs:
        raise InvalidServerResponseError("the certificate chain is empty")
    return tuple(certs)


def _der_length(data: bytes, at: int) -> int:
    """Size of the DER SEQUENCE at ``data[at:]``, header included."""
    if len(data) - at < 2 or data[at] != 0x30:
        raise InvalidServerResponseError("the certificate chain is not concatenated DER")
    first = data[at + 1]
    if first < 0x80:
        size, header = first, 2
    else:
        count = first & 0x7F
        if not 1 <= count <= 3 or len(data) - at < 2 + count:
            raise InvalidServerResponseError("the certificate chain is not concatenated DER")
        size, header = int.from_bytes(data[at + 2 : at + 2 + count], "big"), 2 + count
    if at + header + size > len(data):
        raise InvalidServerResponseError("the certificate chain is truncated")
    return header + size


def check_agent_key(key: StoreKey) -> StoreKey:
    """``key`` if the server can make an agent identity for it.  The agent's WIT-SVID
    takes ES256/ES384/RS256/PS256 keys only (no EdDSA); checked here, before a
    single-use join token is sent for a request that could not succeed."""
    if key.alg.value not in AGENT_KEY_ALGORITHMS:
        raise CustosError(
            f"the agent key {key.name!r} is {key.alg.value}; an agent key must be one of "
            + ", ".join(AGENT_KEY_ALGORITHMS),
            code="invalid_agent_key",
        )
    return key


def make_csr(key: StoreKey) -> bytes:
    """A DER PKCS#10 CSR signed by ``key`` inside its store (the proof of possession).
    The subject is empty: the server takes only the public key."""
    private = key.private_key()
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    spec = key.alg.spec
    try:
        if spec.hash_name is None:  # EdDSA hashes internally
            csr = builder.sign(private, None)
        else:
            algorithm = spec.hash_algorithm()
            assert isinstance(algorithm, hashes.SHA256 | hashes.SHA384)  # every custos alg
            pss = None
            if isinstance(private, rsa.RSAPrivateKey) and spec.pss:
                # The device signs PSS with MGF1 over the same hash and a digest-long salt.
                pss = padding.PSS(
                    mgf=padding.MGF1(algorithm), salt_length=padding.PSS.DIGEST_LENGTH
                )
            csr = builder.sign(private, algorithm, rsa_padding=pss)
    except (ValueError, TypeError) as e:
        raise CustosError(
            f"could not sign a CSR with key {key.name!r}: {e}", code="csr_failed"
        ) from e
    return csr.public_bytes(Encoding.DER)


def key_custody(custody: str, evidence: CertifyEvidence | None = None) -> types_v1_pb2.KeyCustody:
    """The wire's ``KeyCustody``: the tier, and the TPM2_Certify evidence when there is
    some (only for the ``tpm`` tier: :mod:`custos.agent.residency`)."""
    if custody not in CUSTODY_TIERS:
        raise CustosError(
            f"custody must be one of {', '.join(CUSTODY_TIERS)}, not {custody!r:.40}",
            code="invalid_custody",
        )
    if evidence is None:
        return types_v1_pb2.KeyCustody(tier=custody)
    if custody != "tpm":
        raise CustosError(
            f"TPM certify evidence for a key in the {custody!r} tier", code="invalid_custody"
        )
    return types_v1_pb2.KeyCustody(
        tier=custody,
        tpm_certify_info=evidence.attest,
        tpm_certify_signature=evidence.signature,
        tpm_public=evidence.tpm_public,
    )


def key_request(
    csr: bytes, custody: str, evidence: CertifyEvidence | None = None
) -> agent_v1_pb2.AgentKeyRequest:
    return agent_v1_pb2.AgentKeyRequest(csr=csr, custody=key_custody(custody, evidence))


def signed_key_request(
    key: StoreKey, custody: str, residency: KeyResidency | None = None
) -> agent_v1_pb2.AgentKeyRequest:
    """The ``AgentKeyRequest`` for ``key``: its CSR signed in its store and, from
    ``residency``, the certify evidence of a ``tpm``-custody key.  Blocking (a TPM or
    HSM signs synchronously): async code runs it in one worker-thread call."""
    csr = make_csr(key)
    evidence = None if residency is None else residency.evidence(key, custody)
    return key_request(csr, custody, evidence)


def _spki(key: object) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)  # type: ignore[attr-defined,no-any-return]


def identity_from_proto(message: agent_v1_pb2.AgentIdentity, key: StoreKey) -> AgentIdentity:
    """Check the server's ``AgentIdentity`` against the request and the bundle in it."""
    try:
        spiffe_id = SpiffeId.parse(message.spiffe_id)
        bundle = TrustBundle.from_spiffe_json(
            message.bundle.trust_domain, message.bundle.spiffe_bundle
        ).with_sequence(message.bundle.sequence_number or None)
        selectors = tuple(Selector.parse(s) for s in message.selectors)
    except (CustosError, ValueError) as e:
        raise InvalidServerResponseError(f"malformed AgentIdentity: {e}") from e
    chain = der_chain(message.x509_svid)
    if _spki(chain[0].public_key()) != _spki(key.public_key()):
        raise InvalidServerResponseError("the X.509-SVID certifies another key than the agent's")
    if bundle.trust_domain != spiffe_id.trust_domain:
        raise InvalidServerResponseError("the bundle is for another trust domain than the agent")
    try:
        verified = verify_x509_svid(chain, BundleSet([bundle]))
    except (X509SvidError, CertificateFormatError, BundleError) as e:
        raise InvalidServerResponseError(f"the X.509-SVID does not verify: {e.message}") from e
    if verified != spiffe_id:
        raise InvalidServerResponseError("the X.509-SVID names another SPIFFE ID")
    if not message.wit:
        raise InvalidServerResponseError("the AgentIdentity has no WIT")
    return AgentIdentity(
        spiffe_id=spiffe_id,
        x509_svid=chain,
        wit=message.wit,
        bundle=bundle,
        selectors=selectors,
        expires_at=float(message.expires_at),
        reattestable=message.reattestable,
    )


class _Ended(StreamTerminatedError):
    """The server ended the call without a result: raised inside the stream's context,
    whose exit replaces it by the server's status when that is an error."""


class _Exchange:
    """The agent half's ``exchange`` over one ``AttestAgent`` stream.

    Every message from the server is read by one reader task (:meth:`read_all`), so
    that the end of the call (a refusal, the deadline, a lost connection) is seen even
    while the agent half is computing its next answer.  ``key()`` makes the start
    message's key request once the agent half has made its payload: a TPM attestor
    creates its AK there, and certifies the key with it."""

    def __init__(
        self,
        stream: Stream[agent_v1_pb2.AttestAgentRequest, agent_v1_pb2.AttestAgentResponse],
        attestor: str,
        key: Callable[[], Awaitable[agent_v1_pb2.AgentKeyRequest]],
    ) -> None:
        self._stream = stream
        self._attestor = attestor
        self._key = key
        self._started = False
        #: Messages read and not yet taken; ``None`` after the last one.
        self._replies: asyncio.Queue[agent_v1_pb2.AttestAgentResponse | None] = asyncio.Queue()
        self._unread = 0
        self.result: agent_v1_pb2.AgentIdentity | None = None

    async def read_all(self) -> None:
        """Read until the server ends the call (returns) or it fails (raises)."""
        try:
            while (message := await own_task(self._stream.recv_message())) is not None:
                self._unread += 1
                self._replies.put_nowait(message)
        finally:
            self._replies.put_nowait(None)  # after the last message: no more

    async def _end(self) -> None:
        while await self._replies.get() is not None:
            pass
        self._replies.put_nowait(None)

    def unread(self) -> bool:
        """Whether a message the server sent waits to be taken."""
        return self._unread > 0

    async def __call__(self, message: bytes) -> bytes | None:
        if not self._started:
            start = agent_v1_pb2.AttestationStart(
                attestor=self._attestor, payload=message, key=await self._key()
            )
            request = agent_v1_pb2.AttestAgentRequest(start=start)
            self._started = True
        else:
            request = agent_v1_pb2.AttestAgentRequest(challenge_response=message)
        try:
            await own_task(self._stream.send_message(request))
        except (StreamTerminatedError, ProtocolError, H2Error):
            # The server already ended the call (a refusal, its deadline): its status,
            # which the reader is about to see, says why.
            await asyncio.wait_for(self._end(), END_WAIT)
        response = await self._replies.get()
        if response is None:
            self._replies.put_nowait(None)
            raise _Ended("the server ended the attestation without a result")
        self._unread -= 1
        step = response.WhichOneof("step")
        if step == "challenge":
            return bytes(response.challenge)
        if step == "result":
            self.result = response.result
            return None
        raise InvalidServerResponseError("an AttestAgentResponse without a step")


async def attest_agent(
    channel: Channel,
    *,
    attestor: LoadedAgentNodeAttestor,
    key: StoreKey,
    custody: str,
    attestor_name: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    residency: KeyResidency | None = None,
) -> AgentIdentity:
    """Attest this node with ``attestor`` (the agent catalog's ``node_attestor``) and
    get the agent's identity for ``key``.  ``attestor_name`` defaults to the
    attestor's configured name.  ``residency`` (default: from ``attestor``) certifies
    a ``tpm``-custody ``key`` once the attestor made its payload.  Every refusal is an
    :class:`AgentApiError`."""
    name = attestor.name if attestor_name is None else attestor_name
    residency = KeyResidency.of(attestor) if residency is None else residency
    key_custody(custody)  # refused before the stream opens, as a key the server never takes
    check_agent_key(key)

    async def request_key() -> agent_v1_pb2.AgentKeyRequest:
        # After the agent half's payload (a TPM attestor's AK certifies the key):
        # the CSR and that certify in one worker-thread call, keeping the loop free.
        return await asyncio.to_thread(signed_key_request, key, custody, residency)

    stub = agent_v1_grpc.AttestationStub(channel)
    stream = stub.AttestAgent.open(timeout=timeout)
    exchange = _Exchange(stream, name, request_key)
    try:
        # Leaving the context with an exception resets the stream (the server writes
        # nothing for an attestation the agent gave up: a plugin error, a cancelled
        # task), and turns a lost stream into the server's status when it sent one.
        async with stream:
            await own_task(stream.send_request())
            await _exchange(attestor, exchange, stream)
    except Exception as e:
        if exchange.result is None:
            if isinstance(e, _Ended):  # the server's status was OK
                raise InvalidServerResponseError(str(e)) from e
            if isinstance(e, CALL_ERRORS):
                raise translated(e) from e
            raise
        # The result was read: what went wrong afterwards (the end of the call) does
        # not take it away.
    assert exchange.result is not None
    return await asyncio.to_thread(identity_from_proto, exchange.result, key)


async def _exchange(
    attestor: LoadedAgentNodeAttestor,
    exchange: _Exchange,
    stream: Stream[agent_v1_pb2.AttestAgentRequest, agent_v1_pb2.AttestAgentResponse],
) -> None:
    """Run the agent half against the reader; on a result, half-close and give the
    server a moment to end the call.

    grpclib drops what it has received but not yet handed out when the stream is
    reset (grpclib #52), and an HTTP/2 server that ends a call the client has not
    half-closed resets it: so the server waits for this half-close after the
    result (decision 0126)."""
    reader = asyncio.ensure_future(exchange.read_all())
    try:
        await _until_call_ends(attestor.attest(exchange), reader, exchange)
        if exchange.result is None:
            # The agent half returned without the server's result: the server ended
            # the call (its status, when an error, replaces this on the stream's exit).
            raise _Ended("the server ended the attestation without a result")
        with contextlib.suppress(Exception):
            await own_task(stream.end())
            await asyncio.wait_for(asyncio.shield(reader), END_WAIT)
        if not reader.done() or reader.cancelled() or reader.exception() is not None:
            # No clean end from the server: hang up instead of waiting for its status.
            with contextlib.suppress(Exception):
                await own_task(stream.cancel())
    finally:
        if not reader.done():
            reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


async def _until_call_ends(
    work: Awaitable[None], reader: asyncio.Future[None], exchange: _Exchange
) -> None:
    """Run the agent half, but stop it when the server ends the call (a refusal or the
    server's deadline while the agent half is still computing an answer)."""
    flow = asyncio.ensure_future(work)
    try:
        await asyncio.wait({flow, reader}, return_when=asyncio.FIRST_COMPLETED)
        if not flow.done() and exchange.unread():
            # The call ended right after its last message (a result): let the agent
            # half take it.
            await asyncio.wait({flow})
    finally:
        if not flow.done():
            flow.cancel()
            # The agent half's own clean-up runs; its errors do not hide the server's status.
            await asyncio.gather(flow, return_exceptions=True)
    flow_error = None if flow.cancelled() else flow.exception()
    if exchange.result is None and reader.done() and not reader.cancelled():
        error = reader.exception()
        if error is not None:
            raise error  # the call's end: the server's status, the deadline, a lost link
    if flow_error is not None:
        raise flow_error


async def renew_agent(
    client: AgentApiClient,
    key: StoreKey,
    custody: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    residency: KeyResidency | None = None,
) -> AgentIdentity:
    """New credentials for ``key`` (the same key or a new one), authenticated by the
    client's current identity.  For agents whose attestor cannot re-attest (join
    token); a re-attestable agent is refused with ``renew_by_attesting``.  The caller
    replaces the client's identity (and key) with the result.  ``residency``, when
    given, certifies a ``tpm``-custody key."""
    check_agent_key(key)
    key_req = await asyncio.to_thread(signed_key_request, key, custody, residency)
    request = agent_v1_pb2.RenewAgentRequest(key=key_req)
    stub = agent_v1_grpc.AttestationStub(client.channel)
    metadata = await asyncio.to_thread(client.metadata, SERVICE, "RenewAgent")
    response = await run_call(stub.RenewAgent(request, metadata=metadata, timeout=timeout))
    return await asyncio.to_thread(identity_from_proto, response, key)


__all__ = [
    "AGENT_KEY_ALGORITHMS",
    "CUSTODY_TIERS",
    "DEFAULT_TIMEOUT",
    "END_WAIT",
    "SERVICE",
    "AgentIdentity",
    "InvalidServerResponseError",
    "attest_agent",
    "check_agent_key",
    "der_chain",
    "identity_from_proto",
    "key_custody",
    "key_request",
    "make_csr",
    "renew_agent",
    "signed_key_request",
]
