"""``custos.wimse.v1.WimseSigning``: the agent signs for a workload whose key it holds.

Each call names an identity by ``spiffe_id`` ("" = the caller's default, the
first of its identities) and is served only if the attested caller is entitled
to it. Keys in a device (tpm, pkcs11) sign in a worker thread so the event loop
never waits on a device; memory and exportable keys sign inline (~25 µs, less
than a thread hand-off).
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, cast

from grpclib.const import Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from custos._proto import wimse_v1_pb2 as pb
from custos.keys.aio import device_lock
from custos.keys.base import StoreKey
from custos.keys.jose import JoseKey, joserfc_key
from custos.wimse.http.message import HttpMessage
from custos.wimse.httpsig import DEFAULT_TTL as SIGNATURE_TTL
from custos.wimse.httpsig import Form, sign_request, sign_response
from custos.wimse.wit import parse_wit_unverified
from custos.wimse.wpt import DEFAULT_WPT_TTL, Wire, create_wpt

from .server import SIGNING_SERVICE, Call, _Calls, method_handler, request_of
from .sources import ServedIdentity
from .spiffe import der_chain, only, requested_id

T = TypeVar("T")
#: Custody tiers whose keys sign in a device: off the event loop.
_DEVICE_TIERS = frozenset({"tpm", "pkcs11"})


#: RFC 9110 §5.1 field names and §9.1 methods are tokens.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: A field value or a request target: no control characters (no CR/LF smuggling).
_LINE = re.compile(r"[^\x00-\x1f\x7f]*")


def _bad(message: str) -> GRPCError:
    return GRPCError(Status.INVALID_ARGUMENT, message)


def _fields(message: HttpMessage) -> list[pb.HttpField]:
    return [pb.HttpField(name=k, value=v) for k, v in message.headers]


def _headers(fields: Iterable[pb.HttpField]) -> list[tuple[str, str]]:
    out = []
    for f in fields:
        if not _TOKEN.fullmatch(f.name) or not _LINE.fullmatch(f.value):
            raise _bad("a header field name must be a token and its value a single line")
        out.append((f.name, f.value))
    return out


def _request(msg: pb.HttpRequest) -> HttpMessage:
    if not _TOKEN.fullmatch(msg.method):
        raise _bad("the request's method must be an HTTP method token")
    if not msg.target or " " in msg.target or not _LINE.fullmatch(msg.target):
        raise _bad("the request's target must be a path with an optional query")
    return HttpMessage.request(
        msg.method, msg.target, _headers(msg.headers), msg.body if msg.HasField("body") else None
    )


@functools.lru_cache(maxsize=256)
def _wit_exp(wit: str) -> float | None:
    """A served WIT's ``exp``, remembered per WIT (a WIT is served unchanged until it
    rotates; parsing it took ~16 us of every FetchWIT). Errors are not kept."""
    return parse_wit_unverified(wit).exp


#: joserfc views of workload keys kept (one per identity and key generation).
_JOSE_KEYS = 1024


class SigningHandlers:
    def __init__(self, calls: _Calls) -> None:
        self._calls = calls
        # The joserfc view of a key reads its public JWK (from the device, for a
        # TPM or PKCS#11 key): measured ~100 us of a ~270 us WPT in memory. Kept per
        # StoreKey (a new key per rotation is a new entry), least recently used first out.
        self._jose: OrderedDict[StoreKey, JoseKey] = OrderedDict()

    def _jose_key(self, key: StoreKey) -> JoseKey:
        found = self._jose.get(key)
        if found is None:
            found = self._jose[key] = joserfc_key(key)
            if len(self._jose) > _JOSE_KEYS:
                self._jose.popitem(last=False)
        else:
            self._jose.move_to_end(key)
        return found

    def _identity(self, call: Call, spiffe_id: str) -> ServedIdentity:
        return only(call, self._calls.entitled(call), requested_id(spiffe_id))[0]

    async def _sign(self, identity: ServedIdentity, work: Callable[[], T]) -> T:
        if identity.custody in _DEVICE_TIERS:
            # One signing thread per device at a time, the others queued on the loop: a
            # device signs one request at a time anyway, and up to six worker threads
            # waiting on its lock fought the event loop for the GIL (8 clients on SoftHSM:
            # p99 22 -> 13 ms). Correctness does not rest on this lock (the stores
            # serialize their own calls), so a caller cancelled mid-sign may release it
            # early.
            async with device_lock(identity.key.store):
                return await asyncio.to_thread(work)
        return work()

    async def _send_signed(self, stream: Stream[Any, Any], call: Call,
                           identity: ServedIdentity, work: Callable[[], HttpMessage]) -> None:
        signed = await self._sign(identity, work)
        self._calls.alive(call)
        await stream.send_message(
            pb.SignedHttpMessage(spiffe_id=str(identity.spiffe_id), headers=_fields(signed))
        )

    async def fetch_wit(self, stream: Stream[Any, Any], call: Call) -> None:
        request = await request_of(stream)
        identity = self._identity(call, request.spiffe_id)
        exp = _wit_exp(identity.wit)
        self._calls.alive(call)
        await stream.send_message(pb.FetchWITResponse(
            spiffe_id=str(identity.spiffe_id), wit=identity.wit, hint=identity.hint,
            expires_at=int(exp) if exp is not None else 0,
        ))

    async def sign_wpt(self, stream: Stream[Any, Any], call: Call) -> None:
        r = await request_of(stream)
        identity = self._identity(call, r.spiffe_id)
        # One WIT read: the WPT's wth is computed over exactly the WIT returned.
        wit = identity.wit
        work = functools.partial(
            create_wpt, self._jose_key(identity.key), wit, r.audience,
            ttl_seconds=r.ttl_seconds or DEFAULT_WPT_TTL,
            txn_token=r.txn_token if r.HasField("txn_token") else None,
            other_tokens=dict(r.other_tokens) if r.other_tokens else None,
            wire=cast(Wire, r.wire or "wpt-02"),
        )
        wpt = await self._sign(identity, work)
        self._calls.alive(call)
        await stream.send_message(pb.SignWPTResponse(
            spiffe_id=str(identity.spiffe_id), wit=wit, wpt=wpt
        ))

    async def sign_http_request(self, stream: Stream[Any, Any], call: Call) -> None:
        r = await request_of(stream)
        identity = self._identity(call, r.spiffe_id)
        work = functools.partial(
            sign_request, _request(r.request), signer=identity.key, wit=identity.wit,
            audience=r.audience, ttl=r.ttl_seconds or SIGNATURE_TTL,
            sign_response=r.sign_response,
            txn_token=r.txn_token if r.HasField("txn_token") else None,
            form=cast(Form, r.form or "draft-08"),
        )
        await self._send_signed(stream, call, identity, work)

    async def sign_http_response(self, stream: Stream[Any, Any], call: Call) -> None:
        r = await request_of(stream)
        identity = self._identity(call, r.spiffe_id)
        if not 100 <= r.status <= 599:
            raise _bad("the response status must be 100 to 599")
        response = HttpMessage.response(
            r.status, _headers(r.headers), r.body if r.HasField("body") else None
        )
        work = functools.partial(
            sign_response, response, request=_request(r.request), signer=identity.key,
            wit=identity.wit,
            request_nonce=r.request_nonce if r.HasField("request_nonce") else None,
            ttl=r.ttl_seconds or SIGNATURE_TTL,
        )
        await self._send_signed(stream, call, identity, work)

    async def fetch_x509_chain(self, stream: Stream[Any, Any], call: Call) -> None:
        request = await request_of(stream)
        identity = self._identity(call, request.spiffe_id)
        leaf = identity.x509_svid[0]
        self._calls.alive(call)
        await stream.send_message(pb.FetchX509ChainResponse(
            spiffe_id=str(identity.spiffe_id),
            x509_svid=der_chain(identity.x509_svid),
            bundle=der_chain(self._calls.identities.bundle().x509_authorities),
            hint=identity.hint,
            expires_at=int(leaf.not_valid_after_utc.timestamp()),
        ))

    @staticmethod
    async def ping(stream: Stream[Any, Any], call: Call) -> None:
        await stream.recv_message()
        await stream.send_message(pb.PingResponse())


def signing_handlers(calls: _Calls) -> dict[str, Handler]:
    h = SigningHandlers(calls)
    table: list[tuple[str, Any, type, type]] = [
        ("FetchWIT", h.fetch_wit, pb.FetchWITRequest, pb.FetchWITResponse),
        ("SignWPT", h.sign_wpt, pb.SignWPTRequest, pb.SignWPTResponse),
        ("SignHttpRequest", h.sign_http_request, pb.SignHttpRequestRequest, pb.SignedHttpMessage),
        ("SignHttpResponse", h.sign_http_response, pb.SignHttpResponseRequest,
         pb.SignedHttpMessage),
        ("FetchX509Chain", h.fetch_x509_chain, pb.FetchX509ChainRequest,
         pb.FetchX509ChainResponse),
    ]
    mapping = dict(
        method_handler(calls, SIGNING_SERVICE, name, impl, req, rep, streaming=False,
                       spiffe=False)
        for name, impl, req, rep in table
    )
    # The bare round trip: rate-limited like every call, never attested.
    path, handler = method_handler(calls, SIGNING_SERVICE, "Ping", h.ping, pb.PingRequest,
                                   pb.PingResponse, streaming=False, spiffe=False, attest=False)
    mapping[path] = handler
    return mapping


__all__ = ["signing_handlers"]
