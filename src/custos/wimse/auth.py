"""Client-side auth: attach a WIT and a fresh proof to every outgoing request.

- :class:`WimseAuth` for httpx (sync and async clients);
- :class:`WimseRequestsAuth` for requests.

``variant="wpt"`` sends ``Workload-Identity-Token`` and ``Authorization: WPT <jwt>``
(draft-ietf-wimse-wpt-02); ``variant="http-signature"`` signs the request per
draft-ietf-wimse-http-signature-06. The signing itself is a
:class:`custos.wimse.signer.ProofSigner`, so the key may sit in a TPM, an HSM,
this process, or behind the agent.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator, Mapping
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import httpx

from custos.wimse.errors import WimseError
from custos.wimse.http import HttpMessage
from custos.wimse.signer import ProofSigner

if TYPE_CHECKING:
    import requests

Variant = Literal["wpt", "http-signature"]
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Headers the HTTP-signature variant may add to a request.
_SIG_HEADERS = ("workload-identity-token", "content-digest", "signature-input", "signature")


class ClientAuthError(WimseError):
    code = "client_auth_error"


def audience_for(scheme: str, host: str, port: int | None, raw_path: str) -> str:
    """The target URI a proof is bound to: scheme, host, non-default port, path.

    Query and fragment are left out (wpt-02 §3), and the path is taken as it
    goes on the wire so the receiver compares the same bytes.
    """
    path = raw_path.split("?", 1)[0].split("#", 1)[0] or "/"
    host = host.lower()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    shown_port = "" if port is None or port == _DEFAULT_PORTS.get(scheme) else f":{port}"
    return f"{scheme}://{host}{shown_port}{path}"


class _Attacher:
    def __init__(
        self,
        signer: ProofSigner,
        variant: Variant,
        txn_token: str | None,
        other_tokens: Mapping[str, str] | None,
    ) -> None:
        if variant not in ("wpt", "http-signature"):
            raise ClientAuthError(f"unknown variant {variant!r}")
        self.signer = signer
        self.variant = variant
        self.txn_token = txn_token
        self.other_tokens = dict(other_tokens or {})

    def headers_for(
        self,
        method: str,
        audience: str,
        target: str,
        existing: list[tuple[str, str]],
        body: bytes | None,
    ) -> list[tuple[str, str]]:
        """The headers to add (name, value) for one request."""
        extra: list[tuple[str, str]] = []
        if self.txn_token is not None:
            extra.append(("Txn-Token", self.txn_token))
        for name, value in self.other_tokens.items():
            extra.append((name, value))
        if self.variant == "wpt":
            if any(k.lower() == "authorization" for k, _ in existing):
                # wpt-02 carries the proof in Authorization; a request has only one.
                raise ClientAuthError(
                    "the request already has an Authorization header; wpt-02 needs that field "
                    "for the WPT (use variant='http-signature' to keep a bearer token)"
                )
            wpt = self.signer.wpt(
                audience, txn_token=self.txn_token, other_tokens=self.other_tokens or None
            )
            return [
                *extra,
                ("Workload-Identity-Token", self.signer.wit()),
                ("Authorization", f"WPT {wpt}"),
            ]
        message = HttpMessage.request(method, target, [*existing, *extra], body)
        signed = self.signer.sign_http(message, audience)
        added = [(k, v) for k, v in signed.headers if k.lower() in _SIG_HEADERS]
        return [*extra, *added]


class WimseAuth(httpx.Auth):
    """httpx auth that signs every request with the caller's device-held key."""

    requires_request_body = True

    def __init__(
        self,
        signer: ProofSigner,
        *,
        variant: Variant = "wpt",
        txn_token: str | None = None,
        other_tokens: Mapping[str, str] | None = None,
    ) -> None:
        self._attacher = _Attacher(signer, variant, txn_token, other_tokens)

    def _apply(self, request: httpx.Request) -> None:
        url = request.url
        raw = url.raw_path.decode("ascii")
        audience = audience_for(url.scheme, url.host, url.port, raw)
        existing = [(k, v) for k, v in request.headers.multi_items()]
        body = request.content if request.content else None
        for name, value in self._attacher.headers_for(request.method, audience, raw, existing, body):
            request.headers[name] = value

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self.requires_request_body:
            request.read()
        self._apply(request)
        yield request

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        import anyio.to_thread

        if self.requires_request_body:
            await request.aread()
        # A TPM signature takes a millisecond or more: keep it off the event loop.
        await anyio.to_thread.run_sync(self._apply, request)
        yield request


def _requests_auth_base() -> Any:
    try:
        import requests.auth
    except ImportError:  # pragma: no cover - requests is an optional extra
        return object
    return requests.auth.AuthBase


class WimseRequestsAuth(_requests_auth_base()):  # type: ignore[misc]
    """requests auth: ``requests.get(url, auth=WimseRequestsAuth(signer))``."""

    def __init__(
        self,
        signer: ProofSigner,
        *,
        variant: Variant = "wpt",
        txn_token: str | None = None,
        other_tokens: Mapping[str, str] | None = None,
    ) -> None:
        self._attacher = _Attacher(signer, variant, txn_token, other_tokens)

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        assert r.url is not None and r.method is not None
        parts = urlsplit(r.url)
        raw = parts.path or "/"
        target = raw + (f"?{parts.query}" if parts.query else "")
        audience = audience_for(parts.scheme, parts.hostname or "", parts.port, raw)
        body = r.body.encode() if isinstance(r.body, str) else r.body
        if body is not None and not isinstance(body, bytes):
            raise ClientAuthError("streaming request bodies cannot be signed; pass bytes")
        existing = list(r.headers.items())
        for name, value in self._attacher.headers_for(r.method, audience, target, existing, body):
            r.headers[name] = value
        return r
