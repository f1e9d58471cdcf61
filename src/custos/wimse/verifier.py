"""One entry point for relying parties: verify a request in whichever WIMSE
variant it uses (WPT, either wire form, or an HTTP message signature)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, Protocol

from custos._numbers import finite_number
from custos.wimse.errors import MalformedRequestError
from custos.wimse.http.message import HttpMessage
from custos.wimse.wpt import WptVerifier, is_http_uri

if TYPE_CHECKING:
    from custos.bundle import BundleSet, TrustBundle
    from custos.identity import TrustDomain
    from custos.wimse.replay import ReplayCache

VariantName = Literal["wpt", "http-signature"]
VARIANTS: tuple[VariantName, ...] = ("wpt", "http-signature")


@dataclass(frozen=True)
class Caller:
    """The authenticated caller, as handlers see it."""

    subject: str
    trust_domain: str
    variant: VariantName
    wit_claims: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    #: for the HTTP-signature variant: the request nonce a signed response must echo
    nonce: str | None = None
    #: for the HTTP-signature variant: did the caller ask for a signed response
    wants_signed_response: bool = False


class _Verified(Protocol):
    """What both variants' results carry (WPT: :class:`~custos.wimse.wpt.VerifiedCaller`,
    HTTP signature: :class:`~custos.wimse.httpsig.VerifiedSignature`)."""

    @property
    def subject(self) -> object: ...
    @property
    def trust_domain(self) -> object: ...
    @property
    def wit_claims(self) -> Mapping[str, Any]: ...
    @property
    def nonce(self) -> str | None: ...
    @property
    def sign_response(self) -> bool: ...


class _VerifiesRequests(Protocol):
    def verify(self, request: HttpMessage) -> _Verified: ...


class _VerifiesSignatures(Protocol):
    def verify_request(self, request: HttpMessage) -> _Verified: ...


def _caller_from(result: _Verified, variant: VariantName) -> Caller:
    wit_claims = result.wit_claims
    # Positional, in field order (subject, trust_domain, variant, wit_claims,
    # nonce, wants_signed_response): a quarter cheaper than keywords, per request.
    return Caller(
        str(result.subject),
        str(result.trust_domain),
        variant,
        # Already read-only (a MappingProxyType from the WIT verifier): no copy per request.
        wit_claims
        if isinstance(wit_claims, MappingProxyType)
        else MappingProxyType(dict(wit_claims)),
        result.nonce,
        result.sign_response,
    )


def _has_wpt(request: HttpMessage) -> bool:
    if request.header_values("workload-proof-token"):
        return True
    return any(
        v.strip().split(" ", 1)[0].lower() == "wpt" for v in request.header_values("authorization")
    )


def _has_signature(request: HttpMessage) -> bool:
    return bool(request.header_values("signature-input") or request.header_values("signature"))


class RequestVerifier:
    """Dispatches to the WPT or the HTTP-signature verifier.

    A request that carries both a signature and a WPT is ambiguous and refused:
    there is no rule for which one speaks for the caller, and picking one would
    let the other ride along unchecked. A request that carries neither goes to
    the WPT verifier when that variant is on (its errors say what is missing:
    ``wit_missing``, ``wpt_missing``), else to the signature verifier.
    """

    def __init__(
        self,
        *,
        wpt: _VerifiesRequests | None = None,
        http_signature: _VerifiesSignatures | None = None,
    ) -> None:
        if wpt is None and http_signature is None:
            raise ValueError("configure at least one variant")
        self._wpt = wpt
        self._sig = http_signature

    def verify(self, request: HttpMessage) -> Caller:
        has_sig = _has_signature(request)
        if not has_sig and self._wpt is not None:
            # No signature fields: the WPT verifier decides, and its errors
            # say what is missing (wit_missing, wpt_missing).
            return _caller_from(self._wpt.verify(request), "wpt")
        has_wpt = _has_wpt(request)
        if has_sig and has_wpt:
            raise MalformedRequestError(
                "request carries both a WPT and an HTTP signature", code="ambiguous_proof"
            )
        if has_sig or not has_wpt:
            if self._sig is None:
                raise MalformedRequestError(
                    "the HTTP-signature variant is not accepted here", code="variant_not_accepted"
                )
            return _caller_from(self._sig.verify_request(request), "http-signature")
        # A WPT next to no signature, and only the signature variant is on.
        raise MalformedRequestError(
            "the WPT variant is not accepted here", code="variant_not_accepted"
        )


def build_request_verifier(
    bundles: BundleSet | TrustBundle,
    audiences: Sequence[str] | str = (),
    *,
    replay: ReplayCache | None = None,
    accept_wpt01: bool = True,
    variants: Sequence[str] = VARIANTS,
    now: float | None = None,
    wpt_max_ttl: float | None = None,
    wit_profile: Literal["wimse", "spiffe"] = "wimse",
    exact_audiences: Sequence[str] = (),
    known_other_tokens: Sequence[str] = (),
    accept_draft_06: bool = False,
) -> RequestVerifier:
    """The usual wiring: one WIT verifier (and its cache) shared by both
    variants, one replay cache.

    ``bundles``: a :class:`~custos.bundle.BundleSet`, or one
    :class:`~custos.bundle.TrustBundle` when every caller is in one trust
    domain. ``audiences`` are the origins this relying party serves
    (``https://api.example.com``, one string or several), from configuration,
    never from ``Host``.
    ``now`` pins every clock, the replay cache's included (tests, the CLI's
    ``--now``); a replay cache built here with the real clock would treat every
    entry stored under a pinned past ``now`` as long expired and so never
    detect a replay. ``wpt_max_ttl`` overrides how far ahead a WPT's ``exp``
    may lie (:data:`custos.wimse.wpt.DEFAULT_MAX_TTL`). ``wit_profile="spiffe"``
    holds every WIT to the SPIFFE WIT-SVID profile (no EdDSA, no ``aud``,
    ``spiffe://`` subjects only) instead of the WIMSE profile.
    ``exact_audiences``: absolute URIs (say a ``urn:`` or a ``spiffe://`` ID)
    that a proof may name as they are, whatever the request path, in both
    variants (``wpt`` and ``wimse-aud``).
    ``known_other_tokens``: header names of the other tokens (``oth``) this
    relying party understands (:class:`~custos.wimse.wpt.WptVerifier`).
    ``accept_draft_06``: also accept HTTP signatures in the httpsig-06 form
    (``@request-target`` instead of ``@path`` + ``@query``), for callers not
    yet on -08; off by default (:class:`~custos.wimse.httpsig.HttpSignatureVerifier`).
    Anything but a ``BundleSet`` or a ``TrustBundle`` as ``bundles`` is a
    :class:`~custos.wimse.wit.BundlesTypeError` here, not at the first request.
    """
    from custos.wimse.http.origin import normalize_origin
    from custos.wimse.httpsig import HttpSignatureVerifier
    from custos.wimse.replay import MemoryReplayCache
    from custos.wimse.wit import WitVerifier
    from custos.wimse.wpt import DEFAULT_MAX_TTL

    unknown = set(variants) - set(VARIANTS)
    if unknown or not variants:
        raise ValueError(f"variants must be a non-empty subset of {VARIANTS}")
    if isinstance(audiences, str):
        audiences = [audiences]
    origins = [normalize_origin(a) for a in audiences]
    if replay is not None:
        cache = replay
    elif now is not None:
        # Checked here too: this lambda is the replay window's clock.
        pinned = finite_number(now, name="now")
        cache = MemoryReplayCache(clock=lambda: pinned)
    else:
        cache = MemoryReplayCache()
    wits = WitVerifier(bundles, now=now, profile=wit_profile)
    wpt = sig = None
    if "wpt" in variants:
        wpt = WptVerifier(
            wit_verifier=wits,
            audiences=origins,
            # The HTTP-signature variant signs @path, so an agreed http(s)
            # wimse-aud is safe there; a WPT binds the path only through its
            # aud, so http(s) exact audiences are not handed to it.
            exact_audiences=[a for a in exact_audiences if not is_http_uri(a)],
            replay=cache,
            accept_wpt01=accept_wpt01,
            max_ttl=DEFAULT_MAX_TTL if wpt_max_ttl is None else wpt_max_ttl,
            now=now,
            known_other_tokens=known_other_tokens,
        )
    if "http-signature" in variants:
        sig = HttpSignatureVerifier(
            wits,
            cache,
            origins,
            exact_audiences=exact_audiences,
            now=now,
            accept_draft_06=accept_draft_06,
        )
    return RequestVerifier(wpt=wpt, http_signature=sig)


def verifier_from_bundle_file(
    path: str | os.PathLike[str],
    trust_domain: TrustDomain | str,
    audiences: Sequence[str] | str,
    **options: Any,
) -> RequestVerifier:
    """The common relying party in one line: callers from one trust domain
    whose bundle is in the file ``path`` (SPIFFE bundle or JWKS JSON), serving
    ``audiences``; ``options`` are :func:`build_request_verifier`'s::

        verifier = verifier_from_bundle_file("bundle.json", "example.org",
                                             "https://api.example.org")
    """
    from custos.bundle import TrustBundle
    from custos.identity import coerce_trust_domain

    bundle = TrustBundle.load(coerce_trust_domain(trust_domain), path)
    return build_request_verifier(bundle, audiences, **options)
