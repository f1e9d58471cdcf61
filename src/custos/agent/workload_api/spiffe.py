"""The SPIFFE Workload API handlers (spiffe/spiffe standards/SPIFFE_Workload_API.md,
X.509-SVID, JWT-SVID and WIT-SVID profiles), at the upstream paths
``/SpiffeWorkloadAPI/<Method>``.

Calls that carry a private key (FetchX509SVID, FetchWITSVID) serve the caller's
``exportable`` identities only (decision 2); a caller whose identities are all
device-held is told which custos call to use instead.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding
from google.protobuf import struct_pb2
from grpclib.const import Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from custos._proto import workload_pb2 as pb
from custos.bundle import BundleSet, TrustBundle
from custos.bundle.bundle import USE_JWT_SVID, USE_WIT_SVID
from custos.identity.errors import InvalidIdentifierError
from custos.identity.ids import SpiffeId
from custos.jwtsvid import validate_jwt_svid

from .server import (
    SIGNING_SERVICE,
    SPIFFE_SERVICE,
    Call,
    _Calls,
    denied,
    method_handler,
    request_of,
    unique_hints,
)
from .sources import EXPORTABLE, ServedIdentity

log = logging.getLogger(__name__)

#: What the server's NewJWTSVID accepts (custos.server.issuer).
MAX_AUDIENCES = 16
MAX_AUDIENCE_LENGTH = 256


def der_chain(certificates: Sequence[Any]) -> bytes:
    """Certificates as concatenated DER (the Workload API's ``bytes`` chains)."""
    return b"".join(c.public_bytes(Encoding.DER) for c in certificates)


def jwks(bundle: TrustBundle, use: str) -> str:
    """The JWKS of ``bundle``'s keys for ``use`` (a key without a use serves both)."""
    keys = [
        {**a.jwk(), "use": use} for a in bundle.jwt_authorities if a.use in (None, use)
    ]
    return json.dumps({"keys": keys}, separators=(",", ":"), sort_keys=True)


def exportable_only(call: Call, found: list[ServedIdentity], instead: str) -> list[ServedIdentity]:
    """The exportable identities; device-held only is FAILED_PRECONDITION naming ``instead``."""
    exportable = [i for i in found if i.custody == EXPORTABLE]
    if not exportable:
        log.info("workload API: %s: every identity is device-held (%s)", call,
                 ", ".join(sorted({i.custody for i in found})))
        raise GRPCError(
            Status.FAILED_PRECONDITION,
            f"no exportable identity: this caller's keys stay in the agent; use "
            f"{SIGNING_SERVICE}/{instead}",
        )
    return exportable


#: Requested SPIFFE IDs parsed, remembered per string (a workload names the same
#: identity on every call); bounded, and a refusal is never kept.
_parse_requested = functools.lru_cache(maxsize=256)(SpiffeId.parse)


def requested_id(value: str) -> SpiffeId | None:
    if not value:
        return None
    try:
        return _parse_requested(value)
    except InvalidIdentifierError:
        raise GRPCError(Status.INVALID_ARGUMENT, "spiffe_id is not a SPIFFE ID") from None


def only(call: Call, found: list[ServedIdentity], wanted: SpiffeId | None) -> list[ServedIdentity]:
    """``found`` narrowed to ``wanted`` (when given); not entitled is PERMISSION_DENIED."""
    if wanted is None:
        return found
    kept = [i for i in found if i.spiffe_id == wanted]
    if not kept:
        log.warning("workload API: %s asked for %s, which it is not entitled to", call, wanted)
        raise denied("no identity issued")
    return kept


class SpiffeHandlers:
    def __init__(self, calls: _Calls) -> None:
        self._calls = calls
        self._src = calls.identities

    async def _updates(self, stream: Stream[Any, Any], call: Call) -> AsyncIterator[
        list[ServedIdentity]
    ]:
        """The caller's identities now, then again after every change (never an
        empty set: that ends the stream with PERMISSION_DENIED, as SPIRE does)."""
        await stream.recv_message()
        seen = self._src.generation
        while True:
            yield self._calls.entitled(call)
            seen = await self._src.wait_changed(seen)

    async def _send_changes(self, stream: Stream[Any, Any], call: Call, message: Any,
                            last: list[bytes]) -> None:
        """Send ``message`` unless it is what was sent last (a change elsewhere)."""
        wire = message.SerializeToString(deterministic=True)
        if last and last[0] == wire:
            return
        self._calls.alive(call)
        await stream.send_message(message)
        last[:] = [wire]

    async def fetch_x509_svid(self, stream: Stream[Any, Any], call: Call) -> None:
        last: list[bytes] = []
        async for found in self._updates(stream, call):
            chosen = unique_hints(call, exportable_only(call, found, "FetchX509Chain"))
            bundle = der_chain(self._src.bundle().x509_authorities)
            svids = [
                pb.X509SVID(
                    spiffe_id=str(i.spiffe_id),
                    x509_svid=der_chain(i.x509_svid),
                    x509_svid_key=i.private_key_pkcs8(),
                    bundle=bundle,
                    hint=i.hint,
                )
                for i in chosen
            ]
            await self._send_changes(stream, call, pb.X509SVIDResponse(svids=svids), last)

    async def fetch_x509_bundles(self, stream: Stream[Any, Any], call: Call) -> None:
        last: list[bytes] = []
        async for _ in self._updates(stream, call):
            b = self._src.bundle()
            reply = pb.X509BundlesResponse(
                bundles={b.trust_domain.id_string(): der_chain(b.x509_authorities)}
            )
            await self._send_changes(stream, call, reply, last)

    async def fetch_jwt_bundles(self, stream: Stream[Any, Any], call: Call) -> None:
        last: list[bytes] = []
        async for _ in self._updates(stream, call):
            b = self._src.bundle()
            reply = pb.JWTBundlesResponse(
                bundles={b.trust_domain.id_string(): jwks(b, USE_JWT_SVID).encode()}
            )
            await self._send_changes(stream, call, reply, last)

    async def fetch_wit_svid(self, stream: Stream[Any, Any], call: Call) -> None:
        request = await request_of(stream)
        wanted = requested_id(request.spiffe_id)
        last: list[bytes] = []
        seen = self._src.generation
        while True:
            found = only(call, self._calls.entitled(call), wanted)
            chosen = unique_hints(call, exportable_only(call, found, "FetchWIT"))
            svids = [
                pb.WITSVID(
                    spiffe_id=str(i.spiffe_id),
                    wit_svid=i.wit,
                    wit_svid_key=json.dumps(i.private_jwk(), separators=(",", ":")),
                    hint=i.hint,
                )
                for i in chosen
            ]
            await self._send_changes(stream, call, pb.WITSVIDResponse(svids=svids), last)
            seen = await self._src.wait_changed(seen)

    async def fetch_wit_bundles(self, stream: Stream[Any, Any], call: Call) -> None:
        last: list[bytes] = []
        async for _ in self._updates(stream, call):
            b = self._src.bundle()
            reply = pb.WITBundlesResponse(
                bundles={b.trust_domain.id_string(): jwks(b, USE_WIT_SVID)}
            )
            await self._send_changes(stream, call, reply, last)

    async def fetch_jwt_svid(self, stream: Stream[Any, Any], call: Call) -> None:
        request = await request_of(stream)
        audience = list(request.audience)
        if not audience or not all(audience):
            raise GRPCError(Status.INVALID_ARGUMENT, "audience must be specified")
        # The server's own bounds, checked here so a caller cannot spend the
        # agent's calls to the server on requests it will refuse.
        if len(audience) > MAX_AUDIENCES or max(map(len, audience)) > MAX_AUDIENCE_LENGTH:
            raise GRPCError(
                Status.INVALID_ARGUMENT,
                f"at most {MAX_AUDIENCES} audiences of at most {MAX_AUDIENCE_LENGTH} characters",
            )
        wanted = requested_id(request.spiffe_id)
        chosen = unique_hints(call, only(call, self._calls.entitled(call), wanted))
        svids = [
            pb.JWTSVID(
                spiffe_id=str(i.spiffe_id),
                svid=await self._src.jwt_svid(i, audience),
                hint=i.hint,
            )
            for i in chosen
        ]
        self._calls.alive(call)
        await stream.send_message(pb.JWTSVIDResponse(svids=svids))

    async def validate_jwt_svid(self, stream: Stream[Any, Any], call: Call) -> None:
        request = await request_of(stream)
        if not request.audience:
            raise GRPCError(Status.INVALID_ARGUMENT, "audience must be specified")
        if not request.svid:
            raise GRPCError(Status.INVALID_ARGUMENT, "svid must be specified")
        # A relying party may validate without holding an identity itself.
        svid = validate_jwt_svid(request.svid, request.audience, BundleSet([self._src.bundle()]))
        claims = struct_pb2.Struct()
        claims.update(dict(svid.claims))
        self._calls.alive(call)
        await stream.send_message(
            pb.ValidateJWTSVIDResponse(spiffe_id=str(svid.spiffe_id), claims=claims)
        )


def spiffe_handlers(calls: _Calls) -> dict[str, Handler]:
    h = SpiffeHandlers(calls)
    table = [
        ("FetchX509SVID", h.fetch_x509_svid, pb.X509SVIDRequest, pb.X509SVIDResponse, True),
        ("FetchX509Bundles", h.fetch_x509_bundles, pb.X509BundlesRequest,
         pb.X509BundlesResponse, True),
        ("FetchJWTSVID", h.fetch_jwt_svid, pb.JWTSVIDRequest, pb.JWTSVIDResponse, False),
        ("FetchJWTBundles", h.fetch_jwt_bundles, pb.JWTBundlesRequest, pb.JWTBundlesResponse,
         True),
        ("ValidateJWTSVID", h.validate_jwt_svid, pb.ValidateJWTSVIDRequest,
         pb.ValidateJWTSVIDResponse, False),
        ("FetchWITSVID", h.fetch_wit_svid, pb.WITSVIDRequest, pb.WITSVIDResponse, True),
        ("FetchWITBundles", h.fetch_wit_bundles, pb.WITBundlesRequest, pb.WITBundlesResponse,
         True),
    ]
    return dict(
        method_handler(calls, SPIFFE_SERVICE, name, impl, req, rep, streaming=streaming,
                       spiffe=True)
        for name, impl, req, rep, streaming in table
    )


__all__ = ["der_chain", "jwks", "spiffe_handlers"]
