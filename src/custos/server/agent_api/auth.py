"""Agent API call authentication (decision 4): the agent's WIT and a WPT for this call.

Metadata (lower-case gRPC keys, exactly one of each, at most 4 KiB each):
``workload-identity-token: <WIT>`` and ``workload-proof-token: <WPT>``.

Checks, all through :class:`custos.wimse.wpt.WptVerifier` (the one WIT/WPT verifier;
the proof travels in the wpt-01 field, which gRPC metadata maps onto unchanged):

1. the WIT is a WIT-SVID signed by a WIT key of this trust domain's bundle;
2. the WPT is signed by the WIT's key, binds this WIT (``wth``), names exactly this
   call (``aud`` = ``spiffe://<td>/custos/server/<service>/<method>``), is fresh, and
   its ``jti`` was never seen by any server of this datastore (``ctx.datastore.replay``);
3. the WIT's subject is an agent ID (``spiffe://<td>/custos/agent/...``) the
   datastore knows (else UNAUTHENTICATED), neither evicted (it must attest again)
   nor banned: both PERMISSION_DENIED, as SPIRE answers an agent that is "not
   attested or no longer valid";
4. the WIT is the agent's current one: issued no earlier than the agent's last
   (re-)attestation or renewal, minus :data:`AGENT_WIT_LEEWAY` (SPIRE refuses an
   agent SVID whose serial is not the current one: after an eviction and a new
   attestation, a WIT taken from the old key is dead).
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import grpc

from custos.identity import SpiffeId
from custos.server.agent_api.status import AgentApiAuthError, AgentApiForbiddenError, abort
from custos.server.context import ServerContext, api_audience
from custos.server.datastore.records import Agent
from custos.wimse.http.message import HttpMessage
from custos.wimse.wit import WitVerifier
from custos.wimse.wpt import WptVerifier

WIT_METADATA = "workload-identity-token"
WPT_METADATA = "workload-proof-token"
#: Largest WIT or WPT accepted in metadata. A WIT-SVID binding an RSA-4096 key and
#: signed by one is under 3 KiB; 4 KiB each keeps a call's metadata under grpc's
#: 8 KiB soft limit, above which grpc itself refuses calls (RESOURCE_EXHAUSTED) at
#: random until its 16 KiB hard limit, so our refusal is the one a caller sees.
MAX_TOKEN_METADATA = 4 * 1024
#: How much older than the agent's last attestation its WIT may be (issuing the
#: credentials and recording the agent are two steps).
AGENT_WIT_LEEWAY = 30.0
#: Path of every agent ID (``spiffe://<td>/custos/agent/<attestor>/...``).
AGENT_PATH_PREFIX = "/custos/agent/"

#: What a WIT verifier is built from: each key's kid, key store name and alg.
_KeyIds = tuple[tuple[str, str, str], ...]

# One verifier per server context, rebuilt when the WIT keys change: its WitVerifier
# remembers WITs already verified (an agent sends the same WIT with every call).
_verifiers: weakref.WeakKeyDictionary[ServerContext, tuple[_KeyIds, WitVerifier]] = (
    weakref.WeakKeyDictionary()
)
_verifiers_lock = threading.Lock()


async def authenticate(
    context: grpc.aio.ServicerContext, ctx: ServerContext, service: str, method: str
) -> Agent:
    """The agent making this call, or the call ends (UNAUTHENTICATED, PERMISSION_DENIED,
    UNAVAILABLE when the datastore or replay cache is down)."""
    return (await authenticate_caller(context, ctx, service, method)).agent


@dataclass(frozen=True)
class Caller:
    """An authenticated call: the agent, and when the WIT it called with expires (a
    push stream ends then: it must not outlive the credential that opened it)."""

    agent: Agent
    wit_expires_at: float


async def authenticate_caller(
    context: grpc.aio.ServicerContext, ctx: ServerContext, service: str, method: str
) -> Caller:
    """:func:`authenticate`, also saying when the caller's WIT expires."""
    metadata = context.invocation_metadata() or ()
    try:
        return await asyncio.to_thread(verify_caller, ctx, metadata, service, method)
    except Exception as e:  # noqa: BLE001 - every refusal and fault leaves through abort()
        await abort(context, e)


def verify_call(
    ctx: ServerContext, metadata: Iterable[tuple[str, str | bytes]], service: str, method: str
) -> Agent:
    """:func:`authenticate` without gRPC (synchronous: datastore reads, replay cache)."""
    return verify_caller(ctx, metadata, service, method).agent


def verify_caller(
    ctx: ServerContext, metadata: Iterable[tuple[str, str | bytes]], service: str, method: str
) -> Caller:
    """:func:`authenticate_caller` without gRPC."""
    wit = _one(metadata, WIT_METADATA, "wit")
    wpt = _one(metadata, WPT_METADATA, "wpt")
    request = HttpMessage(headers=((WIT_METADATA, wit), (WPT_METADATA, wpt)))
    verifier = WptVerifier(
        wit_verifier=_wit_verifier(ctx),
        exact_audiences=(api_audience(ctx.trust_domain, service, method),),
        replay=ctx.datastore.replay,
    )
    caller = verifier.verify(request, audience=api_audience(ctx.trust_domain, service, method))
    subject = caller.subject
    if (
        not isinstance(subject, SpiffeId)
        or subject.trust_domain != ctx.trust_domain
        or not subject.path.startswith(AGENT_PATH_PREFIX)
    ):
        raise AgentApiAuthError("the caller's WIT does not name an agent", code="not_an_agent")
    agent = ctx.datastore.agents.get(subject)  # unknown: agent_not_found
    if agent.banned:
        raise AgentApiForbiddenError(f"agent {agent.id} is banned", code="agent_banned")
    if agent.evicted:
        raise AgentApiForbiddenError(
            f"agent {agent.id} was evicted and must attest again", code="agent_evicted"
        )
    iat = caller.wit_claims.get("iat")
    if not isinstance(iat, int | float) or iat + AGENT_WIT_LEEWAY < agent.updated_at:
        raise AgentApiAuthError(
            f"the WIT of agent {agent.id} predates its last attestation",
            code="agent_wit_superseded",
        )
    return Caller(agent, caller.wit.expires_at)


def _one(metadata: Iterable[tuple[str, str | bytes]], key: str, what: str) -> str:
    values = [v for k, v in metadata if k == key]
    if not values:
        raise AgentApiAuthError(f"the call has no {key} metadata", code=f"{what}_missing")
    if len(values) > 1:
        raise AgentApiAuthError(f"the call has more than one {key}", code=f"{what}_multiple")
    value = values[0]
    if not isinstance(value, str) or len(value) > MAX_TOKEN_METADATA or not value.isascii():
        raise AgentApiAuthError(
            f"{key} must be ASCII text of at most {MAX_TOKEN_METADATA} bytes",
            code="metadata_too_large",
        )
    return value


def _wit_verifier(ctx: ServerContext) -> WitVerifier:
    """The verifier of the WIT keys the datastore holds *now*: their rows are read on
    every call (a key removed by any server is gone at the next call, decision 0107);
    the bundle is built from the key store again only when the keys themselves
    changed, not their bookkeeping (``last_not_after`` moves with every WIT issued)."""
    records = ctx.wit_keys.records()
    keys = tuple((r.kid, r.key_name, r.alg) for r in records)
    with _verifiers_lock:
        cached = _verifiers.get(ctx)
        if cached is not None and cached[0] == keys:
            return cached[1]
    verifier = WitVerifier(ctx.wit_keys.bundle(records), profile="spiffe")
    with _verifiers_lock:
        _verifiers[ctx] = (keys, verifier)
    return verifier
