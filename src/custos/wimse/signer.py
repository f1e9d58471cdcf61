"""Who makes the proofs: a pluggable signer behind the client-side auth.

``WimseAuth`` asks a :class:`ProofSigner` for a proof per request.
:class:`LocalProofSigner` signs through a key in a local
:class:`custos.keys.KeyStore` (TPM, PKCS#11 or memory); the agent client of a
later issue implements the same protocol by calling the agent's signing API.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol, runtime_checkable

from custos._numbers import seconds
from custos.keys.base import StoreKey
from custos.keys.jose import joserfc_key
from custos.wimse.http.message import HttpMessage
from custos.wimse.httpsig import DEFAULT_TTL as DEFAULT_SIGNATURE_TTL
from custos.wimse.httpsig import sign_request
from custos.wimse.wpt import DEFAULT_WPT_TTL, create_wpt
from custos.wimse.wpt import wpt_ttl as check_wpt_ttl


@dataclass(frozen=True)
class WorkloadProof:
    """A WIT and a WPT made for it.

    Returned together because the WPT's ``wth`` hashes one particular WIT: a
    signer whose WIT rotates between two separate calls would otherwise hand
    out a proof for a token it no longer sends.
    """

    wit: str
    wpt: str

    def __repr__(self) -> str:
        # Tokens are credentials for their lifetime; keep them out of reprs and logs.
        return "WorkloadProof(<redacted>)"


@runtime_checkable
class ProofSigner(Protocol):
    def wpt(
        self,
        audience: str,
        *,
        txn_token: str | None = None,
        other_tokens: Mapping[str, str] | None = None,
    ) -> WorkloadProof:
        """The current WIT and a fresh WPT for ``audience`` (the target URI;
        query and fragment are dropped)."""
        ...

    def sign_http(self, request: HttpMessage, audience: str) -> HttpMessage:
        """The request with WIT, Content-Digest (for a body), Signature-Input
        and Signature added; ``audience`` becomes ``wimse-aud``."""
        ...


class LocalProofSigner:
    """Signs WPTs and HTTP signatures with a key held in a local key store.

    ``wit`` is a string or a callable returning the current WIT, so a caller that
    rotates its WIT can hand in a getter. ``wpt_ttl`` (1 to 300 s) and
    ``signature_ttl`` (how long an HTTP signature stays valid, ``expires -
    created``) are whole seconds or timedeltas, checked here so a NaN or an
    infinite lifetime is refused at construction, not at the first request;
    ``sign_response`` asks the server to sign its responses
    (``wimse-sign-response``).
    """

    def __init__(
        self,
        key: StoreKey,
        wit: str | Callable[[], str],
        *,
        wpt_ttl: int | timedelta = DEFAULT_WPT_TTL,
        signature_ttl: int | timedelta = DEFAULT_SIGNATURE_TTL,
        sign_response: bool = False,
    ) -> None:
        self._key = key
        self._jose_key = joserfc_key(key)
        self._wit = wit
        self._ttl = check_wpt_ttl(wpt_ttl)
        self._sig_ttl = int(seconds(signature_ttl, name="signature_ttl", minimum=1))
        self._sign_response = sign_response

    def wit(self) -> str:
        return self._wit() if callable(self._wit) else self._wit

    def wpt(
        self,
        audience: str,
        *,
        txn_token: str | None = None,
        other_tokens: Mapping[str, str] | None = None,
    ) -> WorkloadProof:
        wit = self.wit()
        token = create_wpt(
            self._jose_key,
            wit,
            audience,
            ttl_seconds=self._ttl,
            txn_token=txn_token,
            other_tokens=other_tokens,
        )
        return WorkloadProof(wit, token)

    def sign_http(self, request: HttpMessage, audience: str) -> HttpMessage:
        return sign_request(
            request,
            signer=self._key,
            wit=self.wit(),
            audience=audience,
            ttl=self._sig_ttl,
            sign_response=self._sign_response,
        )
