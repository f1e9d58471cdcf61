"""Client-side auth: attach a WIT and a fresh proof to every outgoing request,
and check the signed responses that come back.

- :class:`WimseAuth` for httpx (sync and async clients), defined in
  :mod:`custos.integrations.httpx`, needs only the ``httpx`` extra;
- :class:`WimseRequestsAuth` for requests, defined in
  :mod:`custos.integrations.requests`, needs only the ``requests`` extra.

Both are importable from here (and from :mod:`custos.wimse`) and are loaded on
first use: without its library, a class is a
:class:`~custos._extras.MissingExtraError` (``missing_extra``) naming the extra.
A request URL with userinfo (``https://user:pw@host/``) is refused
(``url_has_userinfo``): it would be dropped silently, never signed.

``variant="wpt"`` sends ``Workload-Identity-Token`` and ``Authorization: WPT <jwt>``
(draft-ietf-wimse-wpt-02); ``variant="http-signature"`` signs the request per
draft-ietf-wimse-http-signature. The signing itself is a
:class:`custos.wimse.signer.ProofSigner`, so the key may sit in a TPM, an HSM,
this process, or behind the agent. :meth:`WimseAuth.from_key` builds the usual
one (a store key and its WIT) in one line.

Signed responses (HTTP-signature variant only: a WPT request has no nonce a
response could be bound to). ``response_verifier`` (an
:class:`~custos.wimse.httpsig.HttpSignatureVerifier`, or a
:class:`~custos.bundle.BundleSet` or one :class:`~custos.bundle.TrustBundle` to build
one from) checks every response
that carries a WIMSE signature; ``require_signed_response=True`` also makes
the request ask for one (``wimse-sign-response``) and refuses an unsigned
answer (the draft's MUST) with ``signed_response_missing``;
``expected_responder`` (an identity, a trust domain, ``.../*``, as in a
:class:`~custos.wimse.policy.CallerPolicy`) names who may sign. Any failure
raises a :class:`~custos.wimse.errors.WimseError` from the client call
(``client.get(...)``), so no unchecked response reaches the caller. A signed
response that arrives while no verifier is configured is refused too
(``response_not_verifiable``): a signature nobody checks protects nothing.

The signature covers the response body as received after content decoding
(httpx and requests undo gzip before we see it); a server behind a
compressing proxy cannot sign usefully, and its responses are refused.

Redirects are not re-signed: a proof names one target URI and is good once, so
a redirected request carries a proof the new target refuses. Both httpx (by
default) and requests drop ``Authorization`` when a redirect leaves the origin.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal, Self

from custos._extras import extra_needed
from custos.integrations.errors import ClientAuthError
from custos.wimse.errors import HttpSignatureError
from custos.wimse.http.message import HttpMessage
from custos.wimse.http.origin import target_uri
from custos.wimse.httpsig import (
    HttpSignatureVerifier,
    VerifiedSignature,
    request_signature_input,
)
from custos.wimse.policy import CallerPattern, PolicyConfigError
from custos.wimse.signer import LocalProofSigner, ProofSigner

if TYPE_CHECKING:
    from custos.bundle import BundleSet, TrustBundle
    from custos.integrations.httpx import WimseAuth
    from custos.integrations.requests import WimseRequestsAuth
    from custos.keys.base import StoreKey

Variant = Literal["wpt", "http-signature"]


class ResponderMismatchError(HttpSignatureError):
    """A correctly signed response from someone other than the expected responder."""

    code = "unexpected_responder"


def audience_for(scheme: str, host: str, port: int | None, raw_path: str) -> str:
    """The target URI a proof is bound to: scheme, host, non-default port, path
    (:func:`custos.wimse.http.origin.target_uri`, the rule every verifier uses).

    Query and fragment are left out (wpt-02 §3), and the path is taken as it
    goes on the wire so the receiver compares the same bytes; a path every
    verifier would refuse is refused here, before anything is signed.
    """
    return target_uri(scheme, host, port, raw_path or "/")


def _responders(expected: str | Iterable[str] | None) -> tuple[CallerPattern, ...]:
    if expected is None:
        return ()
    items = [expected] if isinstance(expected, str) else list(expected)
    try:
        return tuple(CallerPattern(str(p) if not isinstance(p, str) else p) for p in items)
    except PolicyConfigError as e:
        raise ClientAuthError(f"expected_responder: {e.message}", code="bad_responder") from e


class Attacher:
    """What both auth classes share: which header fields one request gets,
    and the check of the response that comes back."""

    def __init__(
        self,
        signer: ProofSigner,
        variant: Variant,
        txn_token: str | None,
        other_tokens: Mapping[str, str] | None,
        response_verifier: HttpSignatureVerifier | BundleSet | TrustBundle | None,
        require_signed_response: bool,
        expected_responder: str | Iterable[str] | None,
    ) -> None:
        if variant not in ("wpt", "http-signature"):
            raise ClientAuthError(f"unknown variant {variant!r}")
        self.signer = signer
        self.variant = variant
        self.txn_token = txn_token
        self.other_tokens = dict(other_tokens or {})
        self.require_signed_response = bool(require_signed_response)
        self.responders = _responders(expected_responder)
        wants_checks = (
            response_verifier is not None or self.require_signed_response or self.responders
        )
        if wants_checks and variant != "http-signature":
            raise ClientAuthError(
                "signed responses exist only in the http-signature variant (a WPT request "
                "has no nonce a response could be bound to)",
                code="responses_need_http_signature",
            )
        if (self.require_signed_response or self.responders) and response_verifier is None:
            raise ClientAuthError(
                "checking responses needs response_verifier (a BundleSet or an "
                "HttpSignatureVerifier): the responder's WIT is verified against it",
                code="response_verifier_missing",
            )
        self.response_verifier = _response_verifier(response_verifier)

    def headers_for(
        self,
        method: str,
        audience: str,
        target: str,
        existing: list[tuple[str, str]],
        body: bytes | None,
    ) -> tuple[list[tuple[str, str]], HttpMessage | None]:
        """The header fields (name, value) to add to one request, and the
        signed request (HTTP-signature variant) its response is checked against."""
        extra: list[tuple[str, str]] = []
        if self.txn_token is not None:
            extra.append(("Txn-Token", self.txn_token))
        extra.extend(self.other_tokens.items())
        if self.variant == "wpt":
            if any(k.lower() == "authorization" for k, _ in existing):
                # wpt-02 carries the proof in Authorization and a request has one.
                raise ClientAuthError(
                    "the request already has an Authorization header; wpt-02 needs that field "
                    "for the WPT (use variant='http-signature' to keep a bearer token)",
                    code="authorization_taken",
                )
            proof = self.signer.wpt(
                audience, txn_token=self.txn_token, other_tokens=self.other_tokens or None
            )
            added = [
                *extra,
                ("Workload-Identity-Token", proof.wit),
                ("Authorization", f"WPT {proof.wpt}"),
            ]
            return added, None
        message = HttpMessage.request(method, target, [*existing, *extra], body)
        signed = self.signer.sign_http(message, audience)
        if signed.headers[: len(message.headers)] != message.headers:
            raise ClientAuthError("the signer changed header fields it should only add")
        if self.require_signed_response:
            asked = request_signature_input(signed).params.get("wimse-sign-response")
            if asked is not True:
                raise ClientAuthError(
                    "require_signed_response needs a signer that asks for one "
                    "(LocalProofSigner(..., sign_response=True), or WimseAuth.from_key)",
                    code="sign_response_not_requested",
                )
        # What the signer appended: WIT, Content-Digest, Signature-Input, Signature.
        return [*extra, *signed.headers[len(message.headers) :]], signed

    def check_response(
        self,
        signed: HttpMessage | None,
        status: int,
        headers: Iterable[tuple[str, str]],
        body: bytes,
    ) -> VerifiedSignature | None:
        """Verify the response to ``signed`` (None: a WPT request, nothing to check).

        Raises a WimseError for an unsigned response that was required or
        asked for, a signature that does not verify, and a responder that is
        not the expected one.
        """
        if signed is None:
            return None
        response = HttpMessage.response(status, list(headers), body or None)
        verifier = self.response_verifier
        if verifier is None:
            if response.get_all("signature-input") or response.get_all("signature"):
                raise HttpSignatureError(
                    "a signed response arrived and no response_verifier is configured",
                    code="response_not_verifiable",
                )
            if request_signature_input(signed).params.get("wimse-sign-response") is True:
                # The signer asked for one; the draft's MUST applies even here.
                raise HttpSignatureError(
                    "a signed response was asked for and no response_verifier is configured",
                    code="response_not_verifiable",
                )
            return None
        verified = verifier.verify_response(
            response, signed, require_signed=self.require_signed_response
        )
        if verified is not None and self.responders:
            if not any(p.matches(verified.subject) for p in self.responders):
                raise ResponderMismatchError("the response is signed by an unexpected workload")
        return verified


def _response_verifier(
    given: HttpSignatureVerifier | BundleSet | TrustBundle | None,
) -> HttpSignatureVerifier | None:
    """An HttpSignatureVerifier as given, or one built on a BundleSet (or one
    TrustBundle) with its
    own replay cache (a response nonce is good once, like a request's)."""
    if given is None or isinstance(given, HttpSignatureVerifier):
        return given
    from custos.bundle import BundleSet, TrustBundle
    from custos.wimse.replay import MemoryReplayCache
    from custos.wimse.wit import WitVerifier

    if isinstance(given, TrustBundle):  # one trust domain: the common case
        given = BundleSet([given])
    if not isinstance(given, BundleSet):
        raise ClientAuthError(
            "response_verifier must be an HttpSignatureVerifier or a BundleSet, "
            f"not {type(given).__name__}",
            code="response_verifier_invalid",
        )
    # No audiences: a client checks responses only, never requests.
    return HttpSignatureVerifier(WitVerifier(given), MemoryReplayCache(), [])


def _local_signer(
    key: StoreKey, wit: str | Callable[[], str], variant: Variant, sign_response: bool
) -> LocalProofSigner:
    return LocalProofSigner(key, wit, sign_response=sign_response and variant == "http-signature")


class AuthOptions:
    """What both auth classes take: a signer and the options of the module
    docstring, or (``from_key``) a store key and its WIT."""

    def __init__(
        self,
        signer: ProofSigner,
        *,
        variant: Variant = "wpt",
        txn_token: str | None = None,
        other_tokens: Mapping[str, str] | None = None,
        response_verifier: HttpSignatureVerifier | BundleSet | TrustBundle | None = None,
        require_signed_response: bool = False,
        expected_responder: str | Iterable[str] | None = None,
    ) -> None:
        self._attacher = Attacher(
            signer,
            variant,
            txn_token,
            other_tokens,
            response_verifier,
            require_signed_response,
            expected_responder,
        )

    @classmethod
    def from_key(
        cls,
        key: StoreKey,
        wit: str | Callable[[], str],
        *,
        variant: Variant = "wpt",
        bundles: BundleSet | TrustBundle | None = None,
        require_signed_response: bool = False,
        expected_responder: str | Iterable[str] | None = None,
        txn_token: str | None = None,
        other_tokens: Mapping[str, str] | None = None,
    ) -> Self:
        """One line for the usual client: a store key and the WIT that binds it
        (``WimseAuth.from_key(store.get("web"), wit)``, likewise
        ``WimseRequestsAuth.from_key``); with ``bundles`` the
        signed responses are checked, and ``require_signed_response`` asks for them."""
        return cls(
            _local_signer(key, wit, variant, require_signed_response),
            variant=variant,
            txn_token=txn_token,
            other_tokens=other_tokens,
            response_verifier=bundles,
            require_signed_response=require_signed_response,
            expected_responder=expected_responder,
        )


def refuse_userinfo(present: bool) -> None:
    """Refuse a request URL that carries userinfo (``https://user:pw@host/pay``).

    Neither client sends it on the wire, and the proof would name
    ``https://host/pay``: the credentials the caller wrote would vanish
    without a word. RFC 9110 §4.2.4 deprecates userinfo in http(s) URIs, and
    :func:`custos.wimse.http.origin.normalize_origin` refuses it in origins
    for the same reason. The message never repeats the URL (it holds a secret).
    """
    if present:
        raise ClientAuthError(
            "the request URL carries userinfo (user:password@host); it is never sent and "
            "a proof cannot name it: put credentials in a header field instead",
            code="url_has_userinfo",
        )


#: public name -> (module that defines it, the extra it needs): each client
#: class is imported on first use, so a requests-only install never imports
#: httpx and an httpx-only install never imports requests.
_CLIENTS: dict[str, tuple[str, str]] = {
    "WimseAuth": ("custos.integrations.httpx", "httpx"),
    "WimseRequestsAuth": ("custos.integrations.requests", "requests"),
}


def __getattr__(name: str) -> Any:
    where = _CLIENTS.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, extra = where
    with extra_needed(extra):  # a missing extra: MissingExtraError naming it
        value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


__all__ = [
    "AuthOptions",
    "ClientAuthError",
    "ResponderMismatchError",
    "WimseAuth",
    "WimseRequestsAuth",
    "audience_for",
    "refuse_userinfo",
]
