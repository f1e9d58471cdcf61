"""WIMSE workload-to-workload authentication with HTTP message signatures:
the RFC 9421 profile of draft-ietf-wimse-http-signature-08 (-07's wire form).

A request carries the caller's WIT in ``Workload-Identity-Token`` and an RFC
9421 signature made with the WIT's confirmation key (``cnf.jwk``):

- covered components: ``@method``, ``@path``, ``@query`` (``?`` alone when the
  request has no query) and, when present, ``content-type``,
  ``content-digest``, ``authorization``, ``txn-token``,
  ``workload-identity-token``; never ``@authority`` (proxies rewrite it; the
  recipient is bound by ``wimse-aud``) and no longer ``@request-target``; a
  body always comes with ``Content-Digest`` (RFC 9530);
- parameters: ``created``, ``expires``, ``nonce``,
  ``tag="wimse-workload-to-workload"``, ``wimse-aud`` (mandatory) and, when
  the caller wants a signed answer, ``wimse-sign-response``; never ``keyid``
  or ``alg`` (the WIT carries the key, ``cnf.jwk.alg`` the algorithm);
- a signed response covers ``@status``, the responder's WIT, its
  ``content-type`` / ``content-digest`` and the request's ``@method;req``,
  ``@path;req`` and ``@query;req``, and always echoes the request nonce in
  ``wimse-req-nonce``;
- the WIMSE signature is the one tagged ``wimse-workload-to-workload``; two
  such signatures are refused; every failure is a custos error with a stable
  ``code`` (HTTP statuses live in :mod:`custos.integrations.problem`).

The -06 form (``@request-target``, ``@request-target;req``) is accepted only
by a verifier built with ``accept_draft_06=True`` (off by default), and sent
only with ``sign_request(..., form="draft-06")``; a response to a -06 request
is signed in the -06 form so that the old client can check it
(docs/decisions/0019).

Work before authentication is bounded (issue 7 item 8): the WIT, the
``Signature-Input`` and ``Signature`` fields are refused unparsed above their
size caps, a field with more than :data:`MAX_SIGNATURES` members is refused,
and ``Content-Digest`` is parsed only after the signature checked out.

Why this is built over http-sfv instead of the ``http-message-signatures``
package: that package (3.0) always emits ``keyid`` and only its own parameter
set, both of which the profile forbids or extends (``wimse-aud``,
``wimse-sign-response``, ``wimse-req-nonce``), and its verifier resolves keys by
``keyid``, which WIMSE signatures do not have.  Subclassing it would mean
overriding the signing and verifying paths wholesale; what is left to write
over a structured-field library is the signature base (RFC 9421 §2.5: one line
per component, ``@signature-params`` last), about sixty lines, tested against
the draft's verified example bases.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from types import MappingProxyType
from typing import Any, Literal, Protocol

from http_sfv.dictionary import Dictionary
from http_sfv.item import InnerList, Item

from custos._jose import (
    ASYMMETRIC_ALGORITHMS,
    JoseError,
    b64url_decode,
    loads_strict,
    verify_signature,
)
from custos._numbers import finite_number, seconds
from custos.wimse.digest import (
    ContentDigestError,
    bounded_field_text,
    content_digest,
    verify_content_digest,
)
from custos.wimse.errors import AudienceError, HttpSignatureError, ReplayError, WitError
from custos.wimse.http.message import Endpoint, HttpMessage
from custos.wimse.http.origin import normalize_origin, request_path, signature_path_and_query
from custos.wimse.replay import (
    ReplayCache,
    check_and_store,
    replay_namespace,
)
from custos.wimse.wit import MAX_LEEWAY, MAX_PROOF_LIFETIME, MAX_TOKEN_BYTES

WIMSE_TAG = "wimse-workload-to-workload"
WIT_HEADER = "workload-identity-token"
DEFAULT_LABEL = "wimse"
DEFAULT_TTL = 60
DEFAULT_MAX_AGE = 300
DEFAULT_LEEWAY = 60
#: A nonce longer than this is refused before it reaches the replay cache.
MAX_NONCE_LENGTH = 256
#: Signature-Input / Signature values (all field lines together) larger than
#: this are refused unparsed: the structured-field parse runs before the
#: signature is checked, and its cost grows with the input.  A -08 request
#: signature with a 2 KB ``wimse-aud`` is under 3 KB.
MAX_FIELD_BYTES = 8 * 1024
#: More signatures than this in one message are refused (the draft recommends one).
MAX_SIGNATURES = 8
#: Components / parameters of one signature: a WIMSE signature has at most 12 / 7.
MAX_COMPONENTS = 32
MAX_PARAMETERS = 16
#: Separators (members, items, parameters) in one Signature-Input / Signature:
#: room for MAX_SIGNATURES full signatures, and the parse stays near a millisecond.
MAX_FIELD_TOKENS = 512
#: Which wire form a signature takes: the -07/-08 one, or -06's @request-target.
Form = Literal["draft-08", "draft-06"]

#: Headers a request signature must cover whenever the request has them (-08 §3).
REQUEST_CONDITIONAL = ("content-type", "content-digest", "authorization", "txn-token", WIT_HEADER)
#: Response headers a response signature must cover when present (-08 §3).
RESPONSE_CONDITIONAL = ("content-type", "content-digest")

_DERIVED = frozenset({"@method", "@request-target", "@path", "@query", "@status"})
_REQUEST_COMPONENTS: dict[str, tuple[str, ...]] = {
    "draft-08": ("@method", "@path", "@query"),
    "draft-06": ("@method", "@request-target"),
}
_REQUEST_ONLY_DERIVED = frozenset({"@method", "@request-target", "@path", "@query"})

Clock = float | int | Callable[[], float] | None


# -- errors ---------------------------------------------------------------------------


def _fail(code: str, message: str) -> HttpSignatureError:
    return HttpSignatureError(message, code=code)


#: Every code an HTTP-signature failure can carry (besides the Content-Digest
#: codes of :mod:`custos.wimse.digest`, WitError codes -- ``wit_missing`` and
#: ``wit_multiple`` among them, the same codes as on the WPT path --,
#: ``replayed_proof`` and ``bad_audience``).
HTTPSIG_ERROR_CODES = frozenset(
    {
        "signature_missing",
        "signature_malformed",
        "wimse_signature_missing",
        "wimse_signature_ambiguous",
        "signature_value_missing",
        "keyid_forbidden",
        "alg_forbidden",
        "validity_missing",
        "validity_invalid",
        "signature_expired",
        "signature_not_yet_valid",
        "signature_too_old",
        "nonce_missing",
        "nonce_invalid",
        "wimse_aud_missing",
        "component_not_covered",
        "header_not_covered",
        "component_absent",
        "component_unsupported",
        "component_duplicated",
        "component_value_invalid",
        "content_digest_missing",
        "cnf_alg_unsupported",
        "signature_invalid",
        "wimse_req_nonce_missing",
        "wimse_req_nonce_mismatch",
        "signed_response_missing",
        "signer_alg_mismatch",
        "sign_input_invalid",
        "signed_response_unavailable",
        "signature_too_large",
        "draft06_form_refused",
    }
)


class SignedResponseUnavailableError(HttpSignatureError):
    """The caller asked for a signed response (``wimse-sign-response``) and
    this server cannot sign one.

    httpsig-08 ("Signing the Response", "Error Conditions"): a server required
    to sign MUST NOT return a successful unsigned response, and SHOULD answer
    400 or 501. 400 is chosen: the refusal concerns this request's parameters
    (the caller can retry without ``wimse-sign-response``), it matches the
    draft's status for every other HTTP-signature failure, and unlike 501 it is
    not heuristically cacheable (RFC 9110 §15.6.2), so a cache in between can
    not replay the refusal to requests that did not ask.
    """

    code = "signed_response_unavailable"


# -- what the verifier needs from others --------------------------------------------


class Signer(Protocol):
    """What signs: :class:`custos.keys.base.StoreKey` fits (``alg``, ``sign``).

    ``sign`` returns the JOSE form of the signature (ECDSA raw ``r||s``, Ed25519
    64 bytes), which is also what RFC 9421 §3.3.7 puts on the wire for a JWS
    algorithm.
    """

    @property
    def alg(self) -> str: ...

    def sign(self, data: bytes) -> bytes: ...


class VerifiedWitLike(Protocol):
    """The parts of :class:`custos.wimse.wit.VerifiedWit` this module reads."""

    @property
    def subject(self) -> object: ...

    @property
    def trust_domain(self) -> object: ...

    @property
    def claims(self) -> Mapping[str, Any]: ...

    @property
    def cnf_jwk(self) -> Mapping[str, Any]: ...

    @property
    def cnf_alg(self) -> str: ...

    @property
    def cnf_public_key(self) -> Any:
        """A cryptography public key that came through
        :func:`custos._jose.import_public_jwk` (weak keys refused there)."""
        ...

    @property
    def expires_at(self) -> float: ...


class WitVerifierLike(Protocol):
    """:class:`custos.wimse.wit.WitVerifier` fits; it raises WitError when a WIT is bad."""

    def verify(self, token: str) -> VerifiedWitLike: ...


# -- parsed values ---------------------------------------------------------------------


@dataclass(frozen=True)
class Component:
    """A covered component identifier: a lowercase name and the ``req`` flag."""

    name: str
    req: bool = False

    def serialize(self) -> str:
        item = Item(self.name)
        if self.req:
            item.params["req"] = True
        return str(item)


@dataclass(frozen=True)
class SignatureInput:
    """One member of ``Signature-Input``."""

    label: str
    components: tuple[Component, ...]
    params: Mapping[str, Any]
    #: the ``@signature-params`` value: the member re-serialized by http-sfv
    serialized: str


@dataclass(frozen=True)
class VerifiedSignature:
    """A request or response whose WIMSE signature checked out."""

    subject: str
    trust_domain: str
    nonce: str
    label: str
    created: int
    expires: int
    covered: tuple[str, ...]
    params: Mapping[str, Any]
    #: the request asked for a signed response (``wimse-sign-response``)
    sign_response: bool
    #: ``wimse-aud`` of a request (None on a response)
    audience: str | None
    wit_claims: Mapping[str, Any]
    wit: VerifiedWitLike = field(repr=False)
    variant: str = "http-signature"


@dataclass(frozen=True)
class _Opened:
    """A message's WIT and signature after the checks that need no signature base."""

    wit: VerifiedWitLike
    sig: SignatureInput
    signature: bytes
    nonce: str
    created: int
    expires: int


# -- parsing ----------------------------------------------------------------------------


def _parse_dictionary(values: Sequence[str], what: str) -> Dictionary:
    # Bytes and tokens first (linear scans, before any parse), members after:
    # with both capped, the parse itself is bounded.
    raw = bounded_field_text(values, max_bytes=MAX_FIELD_BYTES, max_tokens=MAX_FIELD_TOKENS)
    if raw is None:
        raise _fail(
            "signature_too_large",
            f"{what} is larger than {MAX_FIELD_BYTES} bytes or {MAX_FIELD_TOKENS} tokens",
        )
    parsed = Dictionary()
    try:
        parsed.parse(raw.encode("ascii"))
    except Exception as e:
        # http-sfv signals bad syntax with ValueError but lets IndexError and
        # friends escape on some truncated inputs; any failure of the
        # third-party parser on attacker-supplied bytes means "malformed".
        raise _fail("signature_malformed", f"{what} is not a structured-field dictionary") from e
    if len(parsed) > MAX_SIGNATURES:
        raise _fail("signature_too_large", f"{what} has more than {MAX_SIGNATURES} members")
    return parsed


def _to_component(item: object) -> Component:
    if not isinstance(item, Item):
        raise _fail("signature_malformed", "a covered component is not an item")
    name = item.value
    if type(name) is not str:
        raise _fail("signature_malformed", "a covered component is not a string")
    if name != name.lower() or not name:
        raise _fail("signature_malformed", "component names are lowercase (RFC 9421 §2.1)")
    params = dict(item.params)
    req = params.pop("req", False)
    if params or (req is not True and req is not False):
        # sf / key / bs / tr / name are not used by this profile; refusing them
        # is simpler and safer than half-supporting them.
        raise _fail("component_unsupported", f"component {name[:40]!r} has unsupported parameters")
    return Component(name, bool(req))


def parse_signature_input(values: str | Sequence[str]) -> dict[str, SignatureInput]:
    """Parse ``Signature-Input`` field lines; raises HttpSignatureError only."""
    lines = [values] if isinstance(values, str) else list(values)
    parsed = _parse_dictionary(lines, "Signature-Input")
    out: dict[str, SignatureInput] = {}
    for label, member in parsed.items():
        if not isinstance(member, InnerList):
            raise _fail(
                "signature_malformed", f"Signature-Input member {label[:40]!r} is not an inner list"
            )
        if len(member) > MAX_COMPONENTS or len(member.params) > MAX_PARAMETERS:
            # Before any per-item work: each item would be converted and re-serialized.
            raise _fail(
                "signature_too_large",
                f"a signature covers more than {MAX_COMPONENTS} components or has more than "
                f"{MAX_PARAMETERS} parameters",
            )
        components = tuple(_to_component(item) for item in member)
        try:
            serialized = str(member)
        except Exception as e:  # same reasoning as in _parse_dictionary
            raise _fail("signature_malformed", "Signature-Input cannot be re-serialized") from e
        # Values keep http-sfv's types: Token and DisplayString subclass str, so
        # checks below compare with ``type(v) is str`` where an sf-string is required.
        params = MappingProxyType(dict(member.params))
        out[label] = SignatureInput(label, components, params, serialized)
    return out


def parse_signature(values: str | Sequence[str]) -> dict[str, bytes]:
    """Parse ``Signature`` field lines into ``{label: signature bytes}``."""
    lines = [values] if isinstance(values, str) else list(values)
    parsed = _parse_dictionary(lines, "Signature")
    out: dict[str, bytes] = {}
    for label, member in parsed.items():
        value = getattr(member, "value", None)
        if isinstance(member, InnerList) or not isinstance(value, bytes):
            raise _fail(
                "signature_malformed", f"Signature member {label[:40]!r} is not a byte sequence"
            )
        out[label] = value
    return out


# -- the signature base (RFC 9421 §2.5) ----------------------------------------------------


def _check_line(value: str, what: str) -> str:
    # A CR/LF inside a value would forge extra lines in the base; RFC 9421 §2.5
    # also requires the base to be ASCII.
    if "\n" in value or "\r" in value or not value.isascii():
        raise _fail("component_value_invalid", f"{what} holds characters a signature base cannot")
    return value


def _component_value(
    component: Component, message: HttpMessage, request: HttpMessage | None
) -> str:
    source = message
    if component.req:
        if message.status is None or request is None:
            raise _fail("component_unsupported", "';req' needs a response and its request")
        source = request
    name = component.name
    if name.startswith("@"):
        if name not in _DERIVED:
            raise _fail(
                "component_unsupported", f"derived component {name[:40]!r} is not supported"
            )
        if name == "@status":
            if source.status is None or component.req:
                raise _fail("component_unsupported", "@status is a response component")
            return f"{source.status:03d}"
        if source.method is None or source.target is None:
            raise _fail("component_unsupported", f"{name} is a request component")
        if name == "@method":
            return source.method
        if name == "@request-target":
            return source.target
        # RFC 9421 §2.2.6 / §2.2.7, through the one set of target rules
        # (custos.wimse.http.origin): "?" alone when there is no query.
        path, query = signature_path_and_query(source.target)
        return path if name == "@path" else query
    values = source.get_all(name)
    if not values:
        raise _fail("component_absent", f"covered header {name[:40]!r} is not in the message")
    # RFC 9421 §2.1: trim each field line, join with ", ".
    return ", ".join(v.strip(" \t") for v in values)


def signature_base(
    message: HttpMessage,
    components: Sequence[Component],
    signature_params: str,
    *,
    request: HttpMessage | None = None,
) -> bytes:
    """The RFC 9421 signature base: one line per component, ``@signature-params`` last.

    ``request`` resolves ``;req`` components when ``message`` is a response.
    """
    seen: set[Component] = set()
    lines: list[str] = []
    for component in components:
        if component in seen:
            raise _fail("component_duplicated", f"{component.serialize()[:60]} is covered twice")
        seen.add(component)
        value = _check_line(_component_value(component, message, request), component.name)
        lines.append(f"{component.serialize()}: {value}")
    lines.append(f'"@signature-params": {_check_line(signature_params, "@signature-params")}')
    return "\n".join(lines).encode("ascii")


def _serialize_params(components: Sequence[Component], params: Sequence[tuple[str, object]]) -> str:
    inner = InnerList()
    for component in components:
        item = Item(component.name)
        if component.req:
            item.params["req"] = True
        inner.append(item)
    for key, value in params:
        inner.params[key] = value
    try:
        return str(inner)
    except ValueError as e:
        raise _fail(
            "sign_input_invalid", "a signature parameter is not a valid structured-field value"
        ) from e


# -- signing --------------------------------------------------------------------------------


def _now(clock: Clock) -> float:
    if clock is None:
        return time.time()
    # A clock that returns NaN would turn every time check off.
    return finite_number(clock() if callable(clock) else clock, name="now", minimum=0)


def _check_clock(clock: Clock) -> Clock:
    """A pinned time or a clock callable, refused at construction when it is
    not a finite number (a callable is checked at every call, in _now)."""
    if clock is not None and not callable(clock):
        finite_number(clock, name="now", minimum=0)
    return clock


def new_nonce() -> str:
    """128 random bits, base64url (a valid sf-string): collisions are negligible."""
    return secrets.token_urlsafe(16)


def _cnf_alg_of(wit: str) -> str | None:
    # The sender reads its own WIT (no trust decision rests on this): only to
    # catch a signer whose algorithm the receiver would refuse, early.
    try:
        claims = loads_strict(b64url_decode(wit.split(".")[1]))
        alg = claims["cnf"]["jwk"]["alg"]
    except (IndexError, ValueError, KeyError, TypeError):
        return None
    return alg if isinstance(alg, str) else None


def _set_single(headers: list[tuple[str, str]], name: str, value: str) -> None:
    existing = [v for k, v in headers if k.lower() == name.lower()]
    if not existing:
        headers.append((name, value))
    elif existing != [value]:
        raise _fail("sign_input_invalid", f"the message already has a different {name} header")


def _prepare(
    message: HttpMessage, signer: Signer, wit: str, label: str, txn_token: str | None
) -> list[tuple[str, str]]:
    cnf_alg = _cnf_alg_of(wit)
    if cnf_alg is not None and cnf_alg != str(signer.alg):
        raise _fail(
            "signer_alg_mismatch",
            f"the signer uses {signer.alg} but the WIT's cnf.jwk.alg is {cnf_alg}",
        )
    headers = list(message.headers)
    existing_inputs = message.get_all("signature-input")
    if existing_inputs:
        inputs = parse_signature_input(existing_inputs)
        if label in inputs:
            raise _fail(
                "sign_input_invalid", f"the message already has a signature labelled {label!r}"
            )
        if any(_is_wimse(i) for i in inputs.values()):
            raise _fail("sign_input_invalid", "the message already carries a WIMSE signature")
    _set_single(headers, "Workload-Identity-Token", wit)
    if txn_token is not None:
        _set_single(headers, "Txn-Token", txn_token)
    digests = [v for k, v in headers if k.lower() == "content-digest"]
    if digests:
        # Never sign a digest that does not match what is sent, empty body
        # included: the verifier checks it against the body it receives (so a
        # HEAD response must leave out the GET content's digest).
        verify_content_digest(digests, message.body)
    elif message.body:
        headers.append(("Content-Digest", content_digest(message.body)))
    return headers


def _finish(
    message: HttpMessage,
    headers: list[tuple[str, str]],
    components: Sequence[Component],
    params: Sequence[tuple[str, object]],
    signer: Signer,
    label: str,
    request: HttpMessage | None,
) -> HttpMessage:
    prepared = HttpMessage(
        tuple(headers), message.body, message.method, message.target, message.status
    )
    serialized = _serialize_params(components, params)
    base = signature_base(prepared, components, serialized, request=request)
    signature = signer.sign(base)
    sig_field = Dictionary()
    try:
        sig_field[label] = signature
        sig_value = str(sig_field)
    except ValueError as e:
        raise _fail("sign_input_invalid", f"{label!r} is not a valid signature label") from e
    return prepared.with_headers(
        [("Signature-Input", f"{label}={serialized}"), ("Signature", sig_value)]
    )


def _ttl(ttl: object) -> int:
    # At least a second: expires must be after created (RFC 9421 §2.3 integers);
    # at most what any verifier's max_age can accept.
    return int(seconds(ttl, name="ttl", minimum=1, maximum=MAX_PROOF_LIFETIME))


def _validity(created: object, ttl: object) -> tuple[int, int]:
    span = _ttl(ttl)
    start = (
        int(time.time())
        if created is None
        else int(finite_number(created, name="created", minimum=0))
    )
    return start, start + span


def _common_params(created: int | None, ttl: int, nonce: str | None) -> list[tuple[str, object]]:
    """The parameters every WIMSE signature carries, request or response."""
    start, end = _validity(created, ttl)
    return [
        ("created", start),
        ("expires", end),
        ("nonce", nonce if nonce is not None else new_nonce()),
        ("tag", WIMSE_TAG),
    ]


def sign_request(
    request: HttpMessage,
    *,
    signer: Signer,
    wit: str,
    audience: str,
    created: int | None = None,
    ttl: int = DEFAULT_TTL,
    nonce: str | None = None,
    sign_response: bool = False,
    txn_token: str | None = None,
    label: str = DEFAULT_LABEL,
    form: Form = "draft-08",
) -> HttpMessage:
    """``request`` with WIT, Content-Digest (for a body), Signature-Input and Signature.

    ``audience`` becomes ``wimse-aud``: by default the target URI without query
    or fragment (:func:`custos.wimse.http.origin.target_uri`). ``sign_response``
    asks the server for a signed response. ``form="draft-06"`` covers
    ``@request-target`` instead of ``@path`` + ``@query``, for a receiver that
    still speaks -06 only.
    """
    if request.method is None or request.target is None:
        raise _fail("sign_input_invalid", "sign_request needs a request")
    if form not in _REQUEST_COMPONENTS:
        raise _fail("sign_input_invalid", f"unknown form {form!r}")
    if not isinstance(audience, str) or not audience:
        raise _fail("sign_input_invalid", "wimse-aud must be a non-empty string")
    headers = _prepare(request, signer, wit, label, txn_token)
    present = {k.lower() for k, _ in headers}
    components = [Component(name) for name in _REQUEST_COMPONENTS[form]]
    components += [Component(name) for name in REQUEST_CONDITIONAL if name in present]
    params = [*_common_params(created, ttl, nonce), ("wimse-aud", audience)]
    if sign_response:
        params.append(("wimse-sign-response", True))
    return _finish(request, headers, components, params, signer, label, None)


def request_signature_input(request: HttpMessage) -> SignatureInput:
    """The WIMSE signature of a (signed) request, selected by its tag."""
    return _select(request)[0]


def _nonce_of(request_signature: SignatureInput) -> str:
    """The request signature's nonce: what a response's ``wimse-req-nonce`` answers."""
    nonce = request_signature.params.get("nonce")
    if type(nonce) is not str:
        raise _fail("wimse_req_nonce_missing", "the request's signature has no nonce")
    return nonce


def sign_response(
    response: HttpMessage,
    *,
    request: HttpMessage,
    signer: Signer,
    wit: str,
    request_nonce: str | None = None,
    created: int | None = None,
    ttl: int = DEFAULT_TTL,
    nonce: str | None = None,
    label: str = DEFAULT_LABEL,
) -> HttpMessage:
    """``response`` signed for ``request`` (which must be the signed request).

    ``request_nonce`` defaults to the ``nonce`` of the request's WIMSE signature;
    it becomes ``wimse-req-nonce``.
    """
    if response.status is None:
        raise _fail("sign_input_invalid", "sign_response needs a response")
    if request.method is None or request.target is None:
        raise _fail("sign_input_invalid", "request must be the request being answered")
    if request_nonce is None:
        request_nonce = _nonce_of(request_signature_input(request))
    headers = _prepare(response, signer, wit, label, None)
    present = {k.lower() for k, _ in headers}
    components = [Component("@status"), Component(WIT_HEADER)]
    components += [Component(name) for name in RESPONSE_CONDITIONAL if name in present]
    # Answer in the form the request was signed in: a -06 client (accepted
    # only behind the compatibility switch) can check only a -06 response.
    form = _request_form(request)
    components += [Component(name, req=True) for name in _REQUEST_COMPONENTS[form]]
    params = [*_common_params(created, ttl, nonce), ("wimse-req-nonce", request_nonce)]
    return _finish(response, headers, components, params, signer, label, request)


class SignsResponses(Protocol):
    """What the relying-party middleware needs to sign its responses:
    :class:`ResponseSigner` fits, and so would a signer behind the agent."""

    def sign(
        self, response: HttpMessage, *, request: HttpMessage, request_nonce: str
    ) -> HttpMessage: ...


class ResponseSigner:
    """Signs a server's responses with the server's own WIT and key.

    ``signer`` is the key the server's WIT binds (a
    :class:`custos.keys.base.StoreKey` fits); ``wit`` is the WIT or a callable
    returning the current one, so a rotating WIT is picked up. Each response
    gets Content-Digest (for a body), the WIT, and a signature with
    ``wimse-req-nonce`` set to the request's nonce (:func:`sign_response`).
    ``now`` pins the clock that stamps ``created`` (tests).
    """

    def __init__(
        self,
        signer: Signer,
        wit: str | Callable[[], str],
        *,
        ttl: int = DEFAULT_TTL,
        now: Clock = None,
        label: str = DEFAULT_LABEL,
    ) -> None:
        self._signer = signer
        self._wit = wit
        self._ttl = _ttl(ttl)
        self._clock = _check_clock(now)
        self._label = label

    def wit(self) -> str:
        return self._wit() if callable(self._wit) else self._wit

    def sign(
        self, response: HttpMessage, *, request: HttpMessage, request_nonce: str
    ) -> HttpMessage:
        return sign_response(
            response,
            request=request,
            signer=self._signer,
            wit=self.wit(),
            request_nonce=request_nonce,
            created=int(_now(self._clock)),
            ttl=self._ttl,
            label=self._label,
        )


# -- verification ----------------------------------------------------------------------------


def _is_wimse(sig: SignatureInput) -> bool:
    tag = sig.params.get("tag")
    return type(tag) is str and tag == WIMSE_TAG


def _select(message: HttpMessage) -> tuple[SignatureInput, bytes]:
    """The one signature tagged ``wimse-workload-to-workload`` and its value.

    Chosen by tag, not by label (RFC 9421 §7.2.5: labels are not meaningful);
    two WIMSE-tagged signatures are refused as ambiguous, since accepting
    either would let a middlebox choose which one counts.
    """
    input_lines = message.get_all("signature-input")
    sig_lines = message.get_all("signature")
    if not input_lines or not sig_lines:
        raise _fail("signature_missing", "the message has no Signature-Input or no Signature")
    inputs = parse_signature_input(input_lines)
    wimse = [i for i in inputs.values() if _is_wimse(i)]
    if not wimse:
        raise _fail("wimse_signature_missing", f"no signature is tagged {WIMSE_TAG!r}")
    if len(wimse) > 1:
        raise _fail("wimse_signature_ambiguous", f"more than one signature is tagged {WIMSE_TAG!r}")
    chosen = wimse[0]
    # Parsed only once Signature-Input has one WIMSE signature: the two
    # parses never both run on a message refused by the first.
    signatures = parse_signature(sig_lines)
    value = signatures.get(chosen.label)
    if value is None:
        raise _fail("signature_value_missing", f"Signature has no member {chosen.label[:40]!r}")
    return chosen, value


def _form_of(sig: SignatureInput) -> Form:
    """-06 when ``@request-target`` is covered (with or without ``;req``), else -08."""
    if any(c.name == "@request-target" for c in sig.components):
        return "draft-06"
    return "draft-08"


def _request_form(request: HttpMessage) -> Form:
    """The form of the request's WIMSE signature; -08 for an unsigned request."""
    if not request.get_all("signature-input"):
        return "draft-08"
    return _form_of(request_signature_input(request))


def _int_param(params: Mapping[str, Any], name: str) -> int:
    value = params.get(name)
    if value is None:
        raise _fail("validity_missing", f"the signature has no {name} parameter")
    if type(value) is not int:
        raise _fail("validity_invalid", f"{name} is not an integer")
    return value


def _verify_with_cnf(wit: VerifiedWitLike, base: bytes, signature: bytes) -> None:
    # RFC 9421 §3.3.7: a JWS algorithm, here always cnf.jwk.alg (the WIT
    # verifier imported the key through custos._jose, weak keys refused).
    alg = wit.cnf_alg
    if not isinstance(alg, str) or alg not in ASYMMETRIC_ALGORITHMS:
        raise _fail("cnf_alg_unsupported", "the WIT's cnf.jwk.alg is not a supported algorithm")
    try:
        # The one signature check (custos._jose): it also refuses a key that
        # does not fit alg, and a signature of the wrong length.
        verify_signature(wit.cnf_public_key, alg, base, signature)
    except JoseError as e:
        if e.code == "jose_bad_signature":
            raise _fail(
                "signature_invalid", "the HTTP signature does not verify with the WIT's cnf key"
            ) from None
        raise _fail("cnf_alg_unsupported", "the WIT's cnf key does not fit its alg") from None


class HttpSignatureVerifier:
    """Verifies WIMSE HTTP message signatures on requests (server side) and
    responses (client side).

    ``audiences`` are the origins this relying party serves, from
    configuration (never from ``Host``). Each is normalised with
    :func:`custos.wimse.http.origin.normalize_origin` (``https://API.example.com:443``
    becomes ``https://api.example.com``); a value with a path, query or
    fragment, or a non-http(s) one, is refused with ValueError, because an
    origin is all it may be.

    The ``wimse-aud`` rule (httpsig-08, "The wimse-aud Signature
    Parameter"): by default the sender sets it to the request's target URI
    without query or fragment, so it is accepted when it equals exactly, as a
    string, a configured origin followed by the request path (checked with
    :func:`custos.wimse.http.origin.request_path`). A bare origin is *not* the
    target URI and is refused: it would make one signature good for every
    path of the service. The draft also lets a deployment agree on its own
    audience value (when intermediaries rewrite the URI); such values go in
    ``exact_audiences`` and match ``wimse-aud`` exactly, and nothing else
    does. ``wimse-aud`` itself is never normalised: senders produce the
    normalised form (:func:`custos.integrations.auth.audience_for`).

    ``max_age`` bounds how old ``created`` may be, whatever ``expires`` says
    (the draft wants signatures that live minutes). ``leeway`` absorbs clock skew.

    ``now`` pins the clock (tests, the CLI's ``--now``); the pinned time is
    also handed to the replay cache with every check (see
    :mod:`custos.wimse.replay`). ``now``, ``max_age`` (1 s to a day) and
    ``leeway`` (0 to 3600 s) must be finite numbers or timedeltas
    (:class:`custos._numbers.InvalidNumberError` otherwise).

    ``accept_draft_06`` accepts signatures in the -06 form (``@request-target``
    instead of ``@path`` + ``@query``); off by default, such a signature is
    refused with ``draft06_form_refused``.
    """

    def __init__(
        self,
        wit_verifier: WitVerifierLike,
        replay: ReplayCache,
        audiences: Sequence[Endpoint | str],
        *,
        exact_audiences: Sequence[str] = (),
        now: Clock = None,
        max_age: float | timedelta = DEFAULT_MAX_AGE,
        leeway: float | timedelta = DEFAULT_LEEWAY,
        require_signed_response: bool = False,
        accept_draft_06: bool = False,
    ) -> None:
        self.wit_verifier = wit_verifier
        self.replay = replay
        self.audiences: tuple[str, ...] = tuple(normalize_origin(a) for a in audiences)
        for value in exact_audiences:
            if not isinstance(value, str) or not value or not value.isprintable():
                raise ValueError("exact_audiences must be non-empty printable strings")
        self.exact_audiences: frozenset[str] = frozenset(exact_audiences)
        # NaN or infinity would switch the time checks off (custos._numbers).
        self.max_age = seconds(max_age, name="max_age", minimum=1, maximum=MAX_PROOF_LIFETIME)
        self.leeway = seconds(leeway, name="leeway", maximum=MAX_LEEWAY)
        self.require_signed_response = require_signed_response
        self.accept_draft_06 = accept_draft_06 is True
        self._clock = _check_clock(now)

    def now(self) -> float:
        return _now(self._clock)

    # -- shared steps --

    def _wit(self, message: HttpMessage) -> tuple[str, VerifiedWitLike]:
        tokens = message.get_all(WIT_HEADER)
        if not tokens:
            raise WitError("the message has no Workload-Identity-Token", code="wit_missing")
        if len(tokens) > 1:
            raise WitError(
                "the message has more than one Workload-Identity-Token", code="wit_multiple"
            )
        token = tokens[0].strip(" \t")
        if len(token) > MAX_TOKEN_BYTES:
            # Refused before any decoding: nothing of it is authenticated yet.
            raise WitError(f"the WIT is larger than {MAX_TOKEN_BYTES} bytes", code="wit_too_large")
        # The WIT is verified before anything in the signature is looked at
        # (-08 §3): its key is what the rest is checked against.
        return token, self.wit_verifier.verify(token)

    def _check_time(self, params: Mapping[str, Any]) -> tuple[int, int]:
        created = _int_param(params, "created")
        expires = _int_param(params, "expires")
        if expires <= created:
            raise _fail("validity_invalid", "expires is not after created")
        now = self.now()
        if created > now + self.leeway:
            raise _fail("signature_not_yet_valid", "created is in the future")
        # ">=": the replay cache keeps a nonce until exactly expires + leeway, so
        # at that instant the signature must already be refused.
        if now >= expires + self.leeway:
            raise _fail("signature_expired", "the signature has expired")
        if now - created >= self.max_age + self.leeway:
            raise _fail("signature_too_old", f"created is more than {self.max_age}s ago")
        return created, expires

    @staticmethod
    def _check_common_params(params: Mapping[str, Any]) -> str:
        if "keyid" in params:
            raise _fail("keyid_forbidden", "WIMSE signatures must not carry keyid")
        if "alg" in params:
            # -08 §3: alg MUST NOT be used; the algorithm is cnf.jwk.alg.
            raise _fail("alg_forbidden", "WIMSE signatures must not carry alg")
        nonce = params.get("nonce")
        if nonce is None:
            raise _fail("nonce_missing", "the signature has no nonce")
        if type(nonce) is not str or not nonce or len(nonce) > MAX_NONCE_LENGTH:
            raise _fail(
                "nonce_invalid", f"nonce must be a string of 1-{MAX_NONCE_LENGTH} characters"
            )
        return nonce

    @staticmethod
    def _check_coverage(
        sig: SignatureInput,
        message: HttpMessage,
        required: Sequence[Component],
        conditional: Sequence[str],
    ) -> None:
        covered = set(sig.components)
        for component in required:
            if component not in covered:
                raise _fail("component_not_covered", f"{component.serialize()} is not covered")
        for name in conditional:
            if message.get_all(name) and Component(name) not in covered:
                raise _fail("header_not_covered", f"the {name} header is present but not covered")

    @staticmethod
    def _check_digest(message: HttpMessage) -> None:
        digests = message.get_all("content-digest")
        if message.body and not digests:
            raise ContentDigestError(
                "a message with a body needs Content-Digest", code="content_digest_missing"
            )
        if digests:
            verify_content_digest(digests, message.body)

    def _check_audience(self, audience: object, request: HttpMessage) -> str:
        """``wimse-aud`` is a configured origin + the request path, or an exact
        deployment-specific value (the rule is in the class docstring)."""
        if audience is None:
            raise _fail("wimse_aud_missing", "the request signature has no wimse-aud")
        if type(audience) is not str:
            raise AudienceError("wimse-aud is not a string")
        # The same refusal of dot segments, encoded slashes and the like as the
        # WPT path: a target that could be normalised elsewhere fails closed,
        # whichever kind of audience the signature names.
        path = request_path(request.target)
        if audience in self.exact_audiences:
            return audience
        for origin in self.audiences:
            if audience == origin + path:
                return audience
        raise AudienceError("wimse-aud does not name this service")

    def _form(self, sig: SignatureInput) -> Form:
        form = _form_of(sig)
        if form == "draft-06" and not self.accept_draft_06:
            raise _fail(
                "draft06_form_refused",
                "the signature covers @request-target (draft -06 form); this verifier "
                "expects @path and @query (accept_draft_06 enables the old form)",
            )
        return form

    def _remember(self, nonce: str, created: int, expires: int) -> None:
        # After the signature checked out, so forged messages can neither fill
        # the cache nor burn a legitimate caller's nonce. Kept only as long as
        # the signature could be accepted (max_age caps a far-off expires), so
        # a caller cannot pin entries in the cache for long.
        until = float(min(expires, created + self.max_age) + self.leeway)
        # -07 (#297): a nonce seen before is refused "without regard to
        # sender" -- one namespace per recipient, not per subject (nonces are
        # random, so honest senders never collide; decision 0019).
        namespace = replay_namespace("http-sig", "")
        # A pinned clock judges the entry too (custos.wimse.replay).
        pinned = None if self._clock is None else self.now()
        if not check_and_store(self.replay, namespace, nonce, until, pinned):
            raise ReplayError("this nonce has been seen before")

    def _open(self, message: HttpMessage) -> _Opened:
        """The steps every message takes before its components are looked at:
        the WIT first (-08 §3: its key is what the rest is checked against),
        then the signature's common parameters and its time."""
        _, wit = self._wit(message)
        sig, signature = _select(message)
        nonce = self._check_common_params(sig.params)
        created, expires = self._check_time(sig.params)
        return _Opened(wit, sig, signature, nonce, created, expires)

    def _accept(
        self,
        opened: _Opened,
        message: HttpMessage,
        request: HttpMessage | None = None,
        *,
        sign_response: bool,
        audience: str | None,
    ) -> VerifiedSignature:
        """Check the signature itself, then the body, then remember the nonce.

        ``request`` is the request a response answers (its ``;req`` components).
        """
        sig = opened.sig
        base = signature_base(message, sig.components, sig.serialized, request=request)
        _verify_with_cnf(opened.wit, base, opened.signature)
        # Content-Digest is parsed only now that the signature (which covers
        # the field) checked out: no unauthenticated caller gets it parsed.
        self._check_digest(message)
        self._remember(opened.nonce, opened.created, opened.expires)
        return VerifiedSignature(
            subject=str(opened.wit.subject),
            trust_domain=str(opened.wit.trust_domain),
            nonce=opened.nonce,
            label=sig.label,
            created=opened.created,
            expires=opened.expires,
            covered=tuple(c.serialize() for c in sig.components),
            params=sig.params,
            sign_response=sign_response,
            audience=audience,
            wit_claims=opened.wit.claims,
            wit=opened.wit,
        )

    # -- requests --

    def verify_request(self, request: HttpMessage) -> VerifiedSignature:
        if request.method is None or request.target is None:
            raise _fail("component_unsupported", "verify_request needs a request")
        opened = self._open(request)
        sig = opened.sig
        audience = self._check_audience(sig.params.get("wimse-aud"), request)
        if any(c.req for c in sig.components):
            raise _fail("component_unsupported", "';req' components are for responses")
        form = self._form(sig)
        required = [Component(name) for name in _REQUEST_COMPONENTS[form]]
        self._check_coverage(sig, request, [*required, Component(WIT_HEADER)], REQUEST_CONDITIONAL)
        return self._accept(
            opened,
            request,
            sign_response=sig.params.get("wimse-sign-response") is True,
            audience=audience,
        )

    # -- responses --

    def verify_response(
        self,
        response: HttpMessage,
        request: HttpMessage,
        *,
        request_nonce: str | None = None,
        require_signed: bool | None = None,
    ) -> VerifiedSignature | None:
        """Verify the server's signature on ``response`` to our signed ``request``.

        Returns None for an unsigned response when none is required. A signed
        response is required when the request asked for one
        (``wimse-sign-response``, always read from the request's signature),
        when this verifier is configured to require one, or when
        ``require_signed`` is true: the argument can only make the check
        stricter, never waive what the request asked for (httpsig-08: the
        client MUST reject an unsigned response then). A WIMSE signature that
        is present is always checked. ``request_nonce`` defaults to the
        request signature's nonce.
        """
        if response.status is None:
            raise _fail("component_unsupported", "verify_response needs a response")
        if request.method is None or request.target is None:
            raise _fail("component_unsupported", "request must be the request that was sent")
        req_sig = request_signature_input(request)
        asked = req_sig.params.get("wimse-sign-response") is True
        if request_nonce is None:
            request_nonce = _nonce_of(req_sig)
        required = asked or self.require_signed_response or bool(require_signed)
        if not self._has_wimse_signature(response):
            if required:
                raise _fail("signed_response_missing", "a signed response was required")
            return None
        opened = self._open(response)
        sig = opened.sig
        req_nonce = sig.params.get("wimse-req-nonce")
        if req_nonce is None:
            raise _fail("wimse_req_nonce_missing", "the response signature has no wimse-req-nonce")
        if type(req_nonce) is not str or req_nonce != request_nonce:
            raise _fail("wimse_req_nonce_mismatch", "wimse-req-nonce is not our request's nonce")
        form = self._form(sig)
        covers = [Component("@status"), Component(WIT_HEADER)]
        covers += [Component(name, req=True) for name in _REQUEST_COMPONENTS[form]]
        self._check_coverage(sig, response, covers, RESPONSE_CONDITIONAL)
        for component in sig.components:
            if not component.req and component.name in _REQUEST_ONLY_DERIVED:
                raise _fail("component_unsupported", f"{component.name} needs ';req' on a response")
        return self._accept(opened, response, request, sign_response=False, audience=None)

    @staticmethod
    def _has_wimse_signature(response: HttpMessage) -> bool:
        """Whether the response carries (or tries to carry) a WIMSE signature.

        Anything unparsable counts as "present" so it gets checked and refused,
        rather than waved through as "unsigned".
        """
        lines = response.get_all("signature-input")
        if not lines and not response.get_all("signature"):
            return False
        if not lines:
            return True
        try:
            inputs = parse_signature_input(lines)
        except HttpSignatureError:
            return True
        return any(_is_wimse(i) for i in inputs.values())


__all__ = [
    "DEFAULT_LABEL",
    "HTTPSIG_ERROR_CODES",
    "MAX_COMPONENTS",
    "MAX_FIELD_BYTES",
    "MAX_FIELD_TOKENS",
    "MAX_PARAMETERS",
    "MAX_SIGNATURES",
    "REQUEST_CONDITIONAL",
    "RESPONSE_CONDITIONAL",
    "WIMSE_TAG",
    "Component",
    "Form",
    "HttpSignatureVerifier",
    "ResponseSigner",
    "SignatureInput",
    "SignedResponseUnavailableError",
    "Signer",
    "SignsResponses",
    "VerifiedSignature",
    "VerifiedWitLike",
    "WitVerifierLike",
    "new_nonce",
    "parse_signature",
    "parse_signature_input",
    "request_signature_input",
    "sign_request",
    "sign_response",
    "signature_base",
]
