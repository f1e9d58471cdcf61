"""What each Workload API call sends and how its answer is read, once for both
clients: an :class:`Op` is the call's path, request and reply parser; the
asyncio and the blocking client only differ in how they carry it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Generic, NamedTuple, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import load_der_private_key
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from custos._numbers import InvalidNumberError, seconds
from custos._proto import wimse_v1_pb2 as wpb
from custos._proto import workload_pb2 as pb
from custos.agent.client.attest import InvalidServerResponseError, der_chain
from custos.client.errors import InvalidRequestError, WorkloadApiResponseError
from custos.errors import CustosError
from custos.identity import SpiffeId
from custos.wimse.http.message import HttpMessage
from custos.wimse.wpt import Wire, wpt_ttl

T = TypeVar("T")
M = TypeVar("M", bound=Message)

SIGNING = "/custos.wimse.v1.WimseSigning/"
SPIFFE = "/SpiffeWorkloadAPI/"
#: The metadata every SPIFFE Workload API request carries (the spec's security header).
SPIFFE_METADATA = (("workload.spiffe.io", "true"),)


@dataclass(frozen=True)
class Op(Generic[T]):
    """One call: ``path``, ``request``, the reply type and how to read it.
    ``spiffe``: a SPIFFE call (carries the security header); ``stream``: a server
    stream of which the first message is the answer."""

    path: str
    request: Any
    reply: type[Any]
    parse: Callable[[Any], T]
    spiffe: bool = False
    stream: bool = False


# -- what the calls return -------------------------------------------------------------

class _Redacted:
    """Tokens and keys are credentials: kept out of reprs (and so out of logs)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spiffe_id={getattr(self, 'spiffe_id', '?')!s}, <redacted>)"


@dataclass(frozen=True, repr=False)
class FetchedWit(_Redacted):
    """An identity's current WIT (compact JWS), its hint and ``exp`` (Unix seconds)."""

    spiffe_id: SpiffeId
    wit: str
    hint: str
    expires_at: float


class SignedWpt(NamedTuple):
    """``(wit, wpt)``: the WPT and the one WIT its ``wth`` binds, from one call."""

    wit: str
    wpt: str

    def __repr__(self) -> str:
        return "SignedWpt(<redacted>)"


@dataclass(frozen=True)
class X509Chain:
    """An identity's X.509-SVID chain (leaf first) and trust bundle; no key."""

    spiffe_id: SpiffeId
    cert_chain: tuple[x509.Certificate, ...]
    bundle: tuple[x509.Certificate, ...]
    hint: str
    expires_at: float


@dataclass(frozen=True, repr=False)
class X509Svid(_Redacted):
    """An ``exportable`` identity's X.509-SVID with its private key (SPIFFE's X509SVID)."""

    spiffe_id: SpiffeId
    cert_chain: tuple[x509.Certificate, ...]
    private_key: PrivateKeyTypes
    bundle: tuple[x509.Certificate, ...]
    hint: str


@dataclass(frozen=True, repr=False)
class JwtSvidToken(_Redacted):
    """A JWT-SVID as the agent issued it (compact JWS)."""

    spiffe_id: SpiffeId
    token: str
    hint: str


@dataclass(frozen=True)
class ValidatedJwtSvid:
    """What ValidateJWTSVID found: the subject and the token's claims."""

    spiffe_id: SpiffeId
    claims: Mapping[str, Any]


# -- reading answers ---------------------------------------------------------------------

def _bad(what: str, cause: Exception | None = None) -> WorkloadApiResponseError:
    detail = f": {cause}" if cause is not None else ""
    return WorkloadApiResponseError(f"the agent's answer is not usable: {what}{detail}")


def _id(value: str) -> SpiffeId:
    try:
        return SpiffeId.parse(value)
    except CustosError as e:
        raise _bad("spiffe_id is not a SPIFFE ID", e) from e


def _chain(data: bytes, what: str) -> tuple[x509.Certificate, ...]:
    try:
        return der_chain(data)
    except InvalidServerResponseError as e:
        raise _bad(what, e) from e


def _token(value: str, what: str) -> str:
    if not value or value.count(".") != 2:
        raise _bad(f"{what} is not a compact JWS")
    return value


def spiffe_id_field(value: str | SpiffeId | None) -> str:
    if value is None:
        return ""
    if isinstance(value, SpiffeId):
        return str(value)
    if not isinstance(value, str):
        raise InvalidRequestError(f"spiffe_id must be a string, not {type(value).__name__}")
    return str(SpiffeId.parse(value))


def ttl_seconds(value: int | timedelta | None, name: str) -> int:
    """0 (the agent's default) or whole seconds, 1 s to a day."""
    if value is None:
        return 0
    try:
        return int(seconds(value, name=name, minimum=1, maximum=86400))
    except InvalidNumberError as e:
        raise InvalidRequestError(e.message) from e


def _message(kind: type[M], **fields: Any) -> M:
    """``kind(**fields)``; a value protobuf cannot take (a number for a string, a
    bad mapping) is InvalidRequestError, not a TypeError from inside protobuf."""
    try:
        return kind(**fields)
    except (TypeError, ValueError) as e:
        raise InvalidRequestError(f"cannot send this {kind.__name__}: {e}") from e


def _fields(message: HttpMessage) -> list[wpb.HttpField]:
    return [_message(wpb.HttpField, name=k, value=v) for k, v in message.headers]


def _http_request(message: HttpMessage) -> wpb.HttpRequest:
    if message.method is None or message.target is None:
        raise InvalidRequestError("an HTTP request needs a method and a target")
    return _message(wpb.HttpRequest, method=message.method, target=message.target,
                           headers=_fields(message), body=message.body)


def _signed_headers(reply: wpb.SignedHttpMessage) -> tuple[tuple[str, str], ...]:
    return tuple((f.name, f.value) for f in reply.headers)


# -- the calls ----------------------------------------------------------------------------

def ping() -> Op[None]:
    return Op(SIGNING + "Ping", wpb.PingRequest(), wpb.PingResponse, lambda _: None)


def fetch_wit(spiffe_id: str | SpiffeId | None) -> Op[FetchedWit]:
    def parse(r: wpb.FetchWITResponse) -> FetchedWit:
        return FetchedWit(_id(r.spiffe_id), _token(r.wit, "the WIT"), r.hint,
                          float(r.expires_at))

    return Op(SIGNING + "FetchWIT", wpb.FetchWITRequest(spiffe_id=spiffe_id_field(spiffe_id)),
              wpb.FetchWITResponse, parse)


def sign_wpt(
    audience: str, *, ttl: int | timedelta | None, txn_token: str | None,
    other_tokens: Mapping[str, str] | None, spiffe_id: str | SpiffeId | None, wire: Wire,
) -> Op[SignedWpt]:
    request = _message(
        wpb.SignWPTRequest, spiffe_id=spiffe_id_field(spiffe_id), audience=audience,
        txn_token=txn_token, other_tokens=dict(other_tokens or {}), wire=wire,
        ttl_seconds=0 if ttl is None else wpt_ttl(ttl),
    )

    def parse(r: wpb.SignWPTResponse) -> SignedWpt:
        return SignedWpt(_token(r.wit, "the WIT"), _token(r.wpt, "the WPT"))

    return Op(SIGNING + "SignWPT", request, wpb.SignWPTResponse, parse)


def sign_http_request(
    message: HttpMessage, audience: str, *, sign_response: bool, ttl: int | timedelta | None,
    txn_token: str | None, spiffe_id: str | SpiffeId | None, form: str,
) -> Op[HttpMessage]:
    request = _message(
        wpb.SignHttpRequestRequest, spiffe_id=spiffe_id_field(spiffe_id),
        request=_http_request(message), audience=audience, sign_response=sign_response,
        ttl_seconds=ttl_seconds(ttl, "ttl"), txn_token=txn_token, form=form,
    )

    def parse(r: wpb.SignedHttpMessage) -> HttpMessage:
        return HttpMessage(_signed_headers(r), message.body, message.method, message.target)

    return Op(SIGNING + "SignHttpRequest", request, wpb.SignedHttpMessage, parse)


def sign_http_response(
    response: HttpMessage, request: HttpMessage, *, request_nonce: str | None,
    ttl: int | timedelta | None, spiffe_id: str | SpiffeId | None,
) -> Op[HttpMessage]:
    if response.status is None:
        raise InvalidRequestError("an HTTP response needs a status")
    call = _message(
        wpb.SignHttpResponseRequest, spiffe_id=spiffe_id_field(spiffe_id),
        status=response.status, headers=_fields(response), body=response.body,
        request=_http_request(request), request_nonce=request_nonce,
        ttl_seconds=ttl_seconds(ttl, "ttl"),
    )

    def parse(r: wpb.SignedHttpMessage) -> HttpMessage:
        return HttpMessage.response(response.status or 0, _signed_headers(r), response.body)

    return Op(SIGNING + "SignHttpResponse", call, wpb.SignedHttpMessage, parse)


def fetch_x509_chain(spiffe_id: str | SpiffeId | None) -> Op[X509Chain]:
    def parse(r: wpb.FetchX509ChainResponse) -> X509Chain:
        return X509Chain(_id(r.spiffe_id), _chain(r.x509_svid, "the X.509-SVID chain"),
                         _chain(r.bundle, "the bundle"), r.hint, float(r.expires_at))

    return Op(SIGNING + "FetchX509Chain",
              wpb.FetchX509ChainRequest(spiffe_id=spiffe_id_field(spiffe_id)),
              wpb.FetchX509ChainResponse, parse)


def fetch_jwt_svids(
    audience: str | Sequence[str], spiffe_id: str | SpiffeId | None
) -> Op[list[JwtSvidToken]]:
    audiences = [audience] if isinstance(audience, str) else list(audience)
    if not audiences or not all(isinstance(a, str) and a for a in audiences):
        raise InvalidRequestError("a JWT-SVID needs at least one non-empty audience")

    def parse(r: pb.JWTSVIDResponse) -> list[JwtSvidToken]:
        if not r.svids:
            raise _bad("no JWT-SVID")
        return [JwtSvidToken(_id(s.spiffe_id), _token(s.svid, "the JWT-SVID"), s.hint)
                for s in r.svids]

    request = _message(pb.JWTSVIDRequest, audience=audiences,
                       spiffe_id=spiffe_id_field(spiffe_id))
    return Op(SPIFFE + "FetchJWTSVID", request, pb.JWTSVIDResponse, parse, spiffe=True)


def validate_jwt_svid(token: str, audience: str) -> Op[ValidatedJwtSvid]:
    def parse(r: pb.ValidateJWTSVIDResponse) -> ValidatedJwtSvid:
        return ValidatedJwtSvid(_id(r.spiffe_id), MessageToDict(r.claims))

    request = _message(pb.ValidateJWTSVIDRequest, audience=audience, svid=token)
    return Op(SPIFFE + "ValidateJWTSVID", request, pb.ValidateJWTSVIDResponse, parse,
              spiffe=True)


def fetch_x509_svids() -> Op[list[X509Svid]]:
    def svid(s: pb.X509SVID) -> X509Svid:
        try:
            key = load_der_private_key(s.x509_svid_key, password=None)
        except (ValueError, TypeError) as e:
            raise _bad("the private key is not unencrypted PKCS#8 DER", e) from e
        return X509Svid(_id(s.spiffe_id), _chain(s.x509_svid, "the X.509-SVID chain"), key,
                        _chain(s.bundle, "the bundle"), s.hint)

    def parse(r: pb.X509SVIDResponse) -> list[X509Svid]:
        if not r.svids:
            raise _bad("no X.509-SVID")
        return [svid(s) for s in r.svids]

    return Op(SPIFFE + "FetchX509SVID", pb.X509SVIDRequest(), pb.X509SVIDResponse, parse,
              spiffe=True, stream=True)


def first(reply: Any) -> Any:
    """A stream's first message (None: the stream ended without one)."""
    if reply is None:
        raise _bad("the stream ended before its first message")
    return reply
