"""Who makes the proofs: a pluggable signer behind the client-side auth.

``WimseAuth`` asks a :class:`ProofSigner` for the current WIT and for a proof
per request. :class:`LocalProofSigner` signs through a key in a local
:class:`custos.keys.KeyStore` (TPM, PKCS#11 or memory); the agent client of a
later issue implements the same protocol by calling the agent's signing API.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

from custos.keys.base import StoreKey
from custos.keys.jose import joserfc_key
from custos.wimse.http import HttpMessage


@runtime_checkable
class ProofSigner(Protocol):
    def wit(self) -> str:
        """The caller's current Workload Identity Token."""
        ...

    def wpt(
        self,
        audience: str,
        *,
        txn_token: str | None = None,
        other_tokens: Mapping[str, str] | None = None,
    ) -> str:
        """A fresh WPT for ``audience`` (the target URI without query or fragment)."""
        ...

    def sign_http(self, request: HttpMessage, audience: str) -> HttpMessage:
        """The request with WIT, Content-Digest, Signature-Input and Signature added."""
        ...


class LocalProofSigner:
    """Signs WPTs and HTTP signatures with a key held in a local key store.

    ``wit`` is a string or a callable returning the current WIT, so a caller that
    rotates its WIT can hand in a getter.
    """

    def __init__(self, key: StoreKey, wit: str | Callable[[], str], *, wpt_ttl: int = 60) -> None:
        self._key = key
        self._jose_key = joserfc_key(key)
        self._wit = wit
        self._ttl = wpt_ttl

    def wit(self) -> str:
        return self._wit() if callable(self._wit) else self._wit

    def wpt(
        self,
        audience: str,
        *,
        txn_token: str | None = None,
        other_tokens: Mapping[str, str] | None = None,
    ) -> str:
        from custos.wimse.wpt import create_wpt

        return create_wpt(
            self._jose_key,
            self.wit(),
            audience,
            ttl_seconds=self._ttl,
            txn_token=txn_token,
            other_tokens=other_tokens,
        )

    def sign_http(self, request: HttpMessage, audience: str) -> HttpMessage:
        from custos.wimse.httpsig import sign_request

        return sign_request(request, signer=self._key, wit=self.wit(), audience=audience)
