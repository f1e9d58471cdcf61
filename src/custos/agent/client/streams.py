"""The agent's side of the server's push streams: ``SyncEntries`` and ``StreamBundle``.

``async for entry_set in sync_entries(client)`` yields the agent's whole entry
set as the server sends it: right away, then after each change that touches
it (decision 10: pushed, not polled).  ``stream_bundle(client)`` does the same
for the trust bundle.  Each message is checked before it is yielded (IDs and
selectors parsed, entries in the agent's trust domain, the bundle of that
trust domain); a refusal or a dropped stream ends the iterator with an
:class:`~custos.agent.client.errors.AgentApiError` (``retryable`` says whether
to reconnect with backoff).  The agent never imports server code: entries
arrive as :class:`AgentEntry`, this module's own value type.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from google.protobuf.message import Message
from grpclib.const import Cardinality, Status

from custos._proto import agent_v1_pb2, types_v1_pb2
from custos.agent.client.attest import CUSTODY_TIERS, InvalidServerResponseError
from custos.agent.client.errors import CALL_ERRORS, AgentApiError, own_task, translated
from custos.bundle import BundleError, TrustBundle
from custos.errors import CustosError
from custos.identity import Selector, SpiffeId, TrustDomain

if TYPE_CHECKING:
    from custos.agent.client.calls import AgentApiClient

ENTRIES_SERVICE = "custos.agent.v1.Entries"
BUNDLES_SERVICE = "custos.agent.v1.Bundles"

M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class AgentEntry:
    """One registration entry as the agent receives it (times in Unix seconds)."""

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


@dataclass(frozen=True)
class EntrySet:
    """Every entry the agent serves now; ``change_seq`` is the server's change
    feed position the set reflects (it grows; equal sets may repeat it)."""

    entries: tuple[AgentEntry, ...]
    change_seq: int


def entry_from_proto(message: types_v1_pb2.Entry, trust_domain: TrustDomain) -> AgentEntry:
    """An :class:`AgentEntry` from the wire; raises
    :class:`~custos.agent.client.attest.InvalidServerResponseError` for anything malformed."""
    try:
        spiffe_id = SpiffeId.parse(message.spiffe_id)
        parent_id = SpiffeId.parse(message.parent_id)
        selectors = tuple(sorted({Selector.parse(s) for s in message.selectors}))
    except CustosError as e:
        raise InvalidServerResponseError(
            f"entry {message.id[:64]!r} from the server is malformed: {e.message}"
        ) from e
    problem = _entry_problem(message, spiffe_id, trust_domain)
    if problem:
        raise InvalidServerResponseError(
            f"entry {message.id[:64]!r} from the server is malformed: {problem}"
        )
    return AgentEntry(
        id=message.id,
        spiffe_id=spiffe_id,
        parent_id=parent_id,
        selectors=selectors,
        x509_svid_ttl=float(message.x509_svid_ttl),
        jwt_svid_ttl=float(message.jwt_svid_ttl),
        wit_ttl=float(message.wit_ttl),
        dns_names=tuple(message.dns_names),
        key_custody=message.key_custody,
        hint=message.hint,
        admin=message.admin,
        downstream=message.downstream,
        expires_at=float(message.expires_at) if message.expires_at else None,
        revision=message.revision,
    )


def _entry_problem(message: types_v1_pb2.Entry, spiffe_id: SpiffeId, td: TrustDomain) -> str:
    if not 0 < len(message.id) <= 64:
        return "its id is not 1 to 64 characters"
    if not spiffe_id.is_member_of(td):
        return f"{spiffe_id} is not in the agent's trust domain {td}"
    if not message.selectors:
        return "it has no selectors"
    if message.key_custody not in CUSTODY_TIERS:
        return f"unknown key custody {message.key_custody[:20]!r}"
    if min(message.x509_svid_ttl, message.jwt_svid_ttl, message.wit_ttl) <= 0:
        return "a TTL is not positive"
    return ""


def bundle_from_proto(message: types_v1_pb2.Bundle, trust_domain: TrustDomain) -> TrustBundle:
    """The trust bundle the server sent; it must be ``trust_domain``'s."""
    if message.trust_domain != str(trust_domain):
        raise InvalidServerResponseError(
            f"the server sent the bundle of {message.trust_domain[:255]!r}, not of {trust_domain}"
        )
    try:
        return TrustBundle.from_spiffe_json(trust_domain, message.spiffe_bundle)
    except BundleError as e:
        raise InvalidServerResponseError(
            f"the bundle from the server is malformed: {e.message}"
        ) from e


async def sync_entries(client: AgentApiClient) -> AsyncIterator[EntrySet]:
    """The agent's entry set now, then after every change (``SyncEntries``)."""
    td = client.identity.spiffe_id.trust_domain
    request = agent_v1_pb2.SyncEntriesRequest()
    async for update in _server_stream(
        client, ENTRIES_SERVICE, "SyncEntries", request, agent_v1_pb2.EntriesUpdate
    ):
        yield EntrySet(tuple(entry_from_proto(e, td) for e in update.entries), update.change_seq)


async def stream_bundle(client: AgentApiClient) -> AsyncIterator[TrustBundle]:
    """The trust bundle now, then after every change (``StreamBundle``)."""
    td = client.identity.spiffe_id.trust_domain
    request = agent_v1_pb2.StreamBundleRequest()
    async for message in _server_stream(
        client, BUNDLES_SERVICE, "StreamBundle", request, types_v1_pb2.Bundle
    ):
        yield bundle_from_proto(message, td)


async def _server_stream(
    client: AgentApiClient, service: str, method: str, request: Message, kind: type[M]
) -> AsyncIterator[M]:
    """One authenticated server stream's messages; a refusal or a lost stream
    becomes :class:`AgentApiError`, and the call is cancelled when the caller stops."""
    # The WPT is signed by the agent's key (a TPM, an HSM): off the loop.
    metadata = await asyncio.to_thread(client.metadata, service, method)
    stream = client.channel.request(
        f"/{service}/{method}", Cardinality.UNARY_STREAM, type(request), kind, metadata=metadata
    )
    # Every way out of this generator is an exception (the caller stopping is
    # GeneratorExit or a cancellation): the stream's exit then resets the call, and
    # turns a lost stream into the server's status when it sent one.
    try:
        async with stream:
            await own_task(stream.send_message(request, end=True))
            while True:
                message = await own_task(stream.recv_message())
                if message is None:
                    # The server's status if it refused (raises), else a clean end:
                    # these streams end cleanly only when a server goes away (restart).
                    await own_task(stream.recv_trailing_metadata())
                    raise AgentApiError("the server ended the stream", status=Status.UNAVAILABLE)
                if not isinstance(message, kind):
                    raise InvalidServerResponseError(
                        f"the server sent a message that does not parse as {kind.__name__}"
                    )
                yield message
    except CALL_ERRORS as e:
        raise translated(e) from e


__all__ = [
    "AgentEntry",
    "EntrySet",
    "bundle_from_proto",
    "entry_from_proto",
    "stream_bundle",
    "sync_entries",
]
