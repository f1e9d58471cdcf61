"""One entry point for relying parties: verify a request in whichever WIMSE
variant it uses (WPT, either wire form, or an HTTP message signature)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, Protocol

from custos.wimse.errors import MalformedRequestError
from custos.wimse.http.message import HttpMessage
from custos.wimse.wpt import VerifiedCaller, WptVerifier

if TYPE_CHECKING:
    from custos.bundle import BundleSet
    from custos.wimse.replay import ReplayCache

VariantName = Literal["wpt", "http-signature"]
VARIANTS: tuple[VariantName, ...] = ("wpt", "http-signature")
_new = object.__new__
#: Where a VerifiedWit keeps its WPT Caller (RequestVerifier.verify).
_CALLER_MEMO = "_custos_wpt_caller"


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


class _VerifiesRequests(Protocol):
    def verify(self, request: HttpMessage) -> Any: ...


class _VerifiesSignatures(Protocol):
    def verify_request(self, request: HttpMessage) -> Any: ...


def _caller_from(result: Any, variant: VariantName) -> Caller:
    wit_claims = getattr(result, "wit_claims", None)
    return Caller(
        subject=str(result.subject),
        trust_domain=str(result.trust_domain),
        variant=variant,
        # Already read-only (a MappingProxyType from the WIT verifier): no copy per request.
        wit_claims=wit_claims
        if isinstance(wit_claims, MappingProxyType)
        else MappingProxyType(dict(wit_claims or {})),
        nonce=getattr(result, "nonce", None),
        wants_signed_response=bool(getattr(result, "sign_response", False)),
    )


def _wpt_caller(result: VerifiedCaller) -> Caller:
    """:func:`_caller_from` for the WPT verifier's own result type.

    Its attributes are known, so no ``getattr`` with a default (each a caught
    AttributeError for the two it lacks) and no isinstance probing; the
    Caller is the same as the generic path builds.
    """
    return _wit_caller(result.subject, result.trust_domain, result.wit_claims)


def _wit_caller(subject: object, trust_domain: object, wit_claims: Mapping[str, Any]) -> Caller:
    """The WPT variant's Caller, built without the frozen dataclass
    ``__init__`` (one ``object.__setattr__`` per field, plus the defaults):
    the same fields, equality and hash as ``Caller(...)``, and just as
    immutable afterwards (the frozen ``__setattr__`` still refuses changes)."""
    caller: Caller = _new(Caller)
    caller.__dict__.update(
        subject=str(subject),
        trust_domain=str(trust_domain),
        variant="wpt",
        # Already read-only (a MappingProxyType from the WIT verifier): no copy per request.
        wit_claims=wit_claims
        if type(wit_claims) is MappingProxyType
        else MappingProxyType(dict(wit_claims)),
        nonce=None,
        wants_signed_response=False,
    )
    return caller


def _has_wpt(request: HttpMessage) -> bool:
    if request.values_of("workload-proof-token"):
        return True
    return any(
        v.strip().split(" ", 1)[0].lower() == "wpt" for v in request.values_of("authorization")
    )


def _has_signature(request: HttpMessage) -> bool:
    return bool(request.values_of("signature-input") or request.values_of("signature"))


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
        # The WPT verifier is ours (not a subclass, not another type): verify
        # may call its _verify_request and build the Caller itself.
        self._wpt_exact = type(wpt) is WptVerifier

    def verify(self, request: HttpMessage) -> Caller:
        if self._wpt_exact:
            index = request._index
            if (
                "signature-input" not in index
                and "signature" not in index
                and "workload-proof-token" not in index
            ):
                # No signature fields: _has_signature is False, so the
                # dispatch below sends the request to the WPT verifier (set)
                # whatever _has_wpt says; this is that branch without the
                # Authorization parse.
                assert isinstance(self._wpt, WptVerifier)
                wit, _, _ = self._wpt._verify_request(request)
                # Straight from the WIT: no VerifiedCaller made only to be
                # taken apart (_wpt_caller builds the same Caller from one).
                # A WPT Caller is a function of the (frozen) WIT alone, and
                # the WIT cache hands out one VerifiedWit per caller, so the
                # Caller is made once per WIT and kept beside its fields
                # (not a field: equality and repr are untouched).  It is
                # immutable, so every request may share it.
                caller: Caller | None = wit.__dict__.get(_CALLER_MEMO)
                if caller is None:
                    caller = _wit_caller(wit.subject, wit.trust_domain, wit.claims)
                    wit.__dict__[_CALLER_MEMO] = caller
                return caller
        has_sig = _has_signature(request)
        has_wpt = _has_wpt(request)
        if has_sig and has_wpt:
            raise MalformedRequestError(
                "request carries both a WPT and an HTTP signature", code="ambiguous_proof"
            )
        if has_sig or (not has_wpt and self._wpt is None):
            if self._sig is None:
                raise MalformedRequestError(
                    "the HTTP-signature variant is not accepted here", code="variant_not_accepted"
                )
            return _caller_from(self._sig.verify_request(request), "http-signature")
        if self._wpt is None:
            raise MalformedRequestError(
                "the WPT variant is not accepted here", code="variant_not_accepted"
            )
        result = self._wpt.verify(request)
        if type(result) is VerifiedCaller:
            return _wpt_caller(result)
        return _caller_from(result, "wpt")


def build_request_verifier(
    bundles: BundleSet,
    audiences: Sequence[str],
    *,
    replay: ReplayCache | None = None,
    accept_wpt01: bool = True,
    variants: Sequence[str] = VARIANTS,
    now: float | None = None,
    wpt_max_ttl: int | None = None,
    wit_profile: Literal["wimse", "spiffe"] = "wimse",
    exact_audiences: Sequence[str] = (),
) -> RequestVerifier:
    """The usual wiring: one WIT verifier (and its cache) shared by both
    variants, one replay cache.

    ``audiences`` are the origins this relying party serves
    (``https://api.example.com``), from configuration, never from ``Host``.
    ``now`` pins every clock, the replay cache's included (tests, the CLI's
    ``--now``); a replay cache built here with the real clock would treat every
    entry stored under a pinned past ``now`` as long expired and so never
    detect a replay. ``wpt_max_ttl`` overrides how far ahead a WPT's ``exp``
    may lie (:data:`custos.wimse.wpt.DEFAULT_MAX_TTL`). ``wit_profile="spiffe"``
    holds every WIT to the SPIFFE WIT-SVID profile (no EdDSA, no ``aud``,
    ``spiffe://`` subjects only) instead of the WIMSE profile.
    ``exact_audiences``: deployment-specific ``wimse-aud`` values (say a
    ``urn:``) that the HTTP-signature variant accepts as they are; WPT
    audiences are always a configured origin plus the request path.
    """
    from custos.wimse.httpsig import HttpSignatureVerifier
    from custos.wimse.replay import MemoryReplayCache
    from custos.wimse.wit import WitVerifier
    from custos.wimse.wpt import DEFAULT_MAX_TTL, normalize_origin

    unknown = set(variants) - set(VARIANTS)
    if unknown or not variants:
        raise ValueError(f"variants must be a non-empty subset of {VARIANTS}")
    origins = [normalize_origin(a) for a in audiences]
    if replay is not None:
        cache = replay
    elif now is not None:
        pinned = float(now)
        cache = MemoryReplayCache(clock=lambda: pinned)
    else:
        cache = MemoryReplayCache()
    wits = WitVerifier(bundles, now=now, profile=wit_profile)
    wpt = sig = None
    if "wpt" in variants:
        wpt = WptVerifier(
            wit_verifier=wits,
            audiences=origins,
            replay=cache,
            accept_wpt01=accept_wpt01,
            max_ttl=DEFAULT_MAX_TTL if wpt_max_ttl is None else wpt_max_ttl,
            now=now,
        )
    if "http-signature" in variants:
        sig = HttpSignatureVerifier(
            wits, cache, origins, exact_audiences=exact_audiences, now=now
        )
    return RequestVerifier(wpt=wpt, http_signature=sig)
