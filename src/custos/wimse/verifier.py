"""One entry point for relying parties: verify a request in whichever WIMSE
variant it uses (WPT, either wire form, or an HTTP message signature)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from custos.wimse.errors import MalformedRequestError
from custos.wimse.http import HttpMessage


@dataclass(frozen=True)
class Caller:
    """The authenticated caller, as handlers see it."""

    subject: str
    trust_domain: str
    variant: str  # "wpt" | "http-signature"
    wit_claims: Mapping[str, Any] = field(default_factory=dict)
    #: for the HTTP-signature variant: the request nonce a signed response must echo
    nonce: str | None = None
    #: for the HTTP-signature variant: did the caller ask for a signed response
    wants_signed_response: bool = False


class _VerifiesRequests(Protocol):
    def verify(self, request: HttpMessage) -> Any: ...


class _VerifiesSignatures(Protocol):
    def verify_request(self, request: HttpMessage) -> Any: ...


def _caller_from(result: Any, variant: str) -> Caller:
    wit_claims = getattr(result, "wit_claims", None) or {}
    return Caller(
        subject=str(result.subject),
        trust_domain=str(result.trust_domain),
        variant=variant,
        wit_claims=wit_claims,
        nonce=getattr(result, "nonce", None),
        wants_signed_response=bool(getattr(result, "sign_response", False)),
    )


class RequestVerifier:
    """Dispatches to the WPT or the HTTP-signature verifier.

    A request that carries both a WIMSE signature and a WPT is ambiguous and
    refused: accepting either would let an attacker pick the weaker check.
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

    @staticmethod
    def _has_wpt(request: HttpMessage) -> bool:
        if request.get_all("workload-proof-token"):
            return True
        return any(
            v.strip().split(" ", 1)[0].lower() == "wpt" for v in request.get_all("authorization")
        )

    def verify(self, request: HttpMessage) -> Caller:
        has_sig = bool(request.get_all("signature-input") or request.get_all("signature"))
        has_wpt = self._has_wpt(request)
        if has_sig and has_wpt:
            raise MalformedRequestError("request carries both a WPT and an HTTP signature")
        if has_sig:
            if self._sig is None:
                raise MalformedRequestError("HTTP-signature variant not accepted here")
            return _caller_from(self._sig.verify_request(request), "http-signature")
        if self._wpt is None:
            raise MalformedRequestError("WPT variant not accepted here")
        return _caller_from(self._wpt.verify(request), "wpt")


def build_request_verifier(
    bundles: Any,
    audiences: Sequence[str],
    *,
    replay: Any = None,
    accept_wpt01: bool = True,
    variants: Sequence[str] = ("wpt", "http-signature"),
    now: float | None = None,
) -> RequestVerifier:
    """The usual wiring: a WIT verifier shared by both variants, one replay cache."""
    from custos.wimse.httpsig import HttpSignatureVerifier
    from custos.wimse.replay import MemoryReplayCache
    from custos.wimse.wit import WitVerifier
    from custos.wimse.wpt import WptVerifier

    cache = replay if replay is not None else MemoryReplayCache()
    wits = WitVerifier(bundles, now=now) if now is not None else WitVerifier(bundles)
    wpt = sig = None
    if "wpt" in variants:
        wpt = WptVerifier(
            wit_verifier=wits, audiences=list(audiences), replay=cache,
            accept_wpt01=accept_wpt01, now=now,
        )
    if "http-signature" in variants:
        sig = HttpSignatureVerifier(wits, cache, list(audiences), now=now)
    return RequestVerifier(wpt=wpt, http_signature=sig)
