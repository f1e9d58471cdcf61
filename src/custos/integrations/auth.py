"""Client-side auth: attach a WIT and a fresh proof to every outgoing request.

- :class:`WimseAuth` for httpx (sync and async clients);
- :class:`WimseRequestsAuth` for requests.

``variant="wpt"`` sends ``Workload-Identity-Token`` and ``Authorization: WPT <jwt>``
(draft-ietf-wimse-wpt-02); ``variant="http-signature"`` signs the request per
draft-ietf-wimse-http-signature-06. The signing itself is a
:class:`custos.wimse.signer.ProofSigner`, so the key may sit in a TPM, an HSM,
this process, or behind the agent.

Redirects are not re-signed: a proof names one target URI and is good once, so
a redirected request carries a proof the new target refuses. Both httpx (by
default) and requests drop ``Authorization`` when a redirect leaves the origin.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator, Mapping
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

import anyio.to_thread
import httpx

from custos.wimse.errors import WimseError
from custos.wimse.http.message import HttpMessage
from custos.wimse.signer import ProofSigner

if TYPE_CHECKING:
    import requests
    from requests.auth import AuthBase as _RequestsAuthBase
else:
    try:
        from requests.auth import AuthBase as _RequestsAuthBase
    except ImportError:  # pragma: no cover - requests is an optional extra
        _RequestsAuthBase = object

Variant = Literal["wpt", "http-signature"]
_DEFAULT_PORTS = {"http": 80, "https": 443}


class ClientAuthError(WimseError):
    """The request cannot be signed as it stands (a caller mistake)."""

    code = "client_auth_error"
    status = 500


def audience_for(scheme: str, host: str, port: int | None, raw_path: str) -> str:
    """The target URI a proof is bound to: scheme, host, non-default port, path.

    Query and fragment are left out (wpt-02 §3), and the path is taken as it
    goes on the wire so the receiver compares the same bytes.
    """
    path = raw_path.split("?", 1)[0].split("#", 1)[0] or "/"
    scheme = scheme.lower()
    host = host.lower()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    shown_port = "" if port is None or port == _DEFAULT_PORTS.get(scheme) else f":{port}"
    return f"{scheme}://{host}{shown_port}{path}"


class _Attacher:
    """What both auth classes share: which header fields one request gets."""

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
        """The header fields (name, value) to add to one request."""
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
            return [
                *extra,
                ("Workload-Identity-Token", proof.wit),
                ("Authorization", f"WPT {proof.wpt}"),
            ]
        message = HttpMessage.request(method, target, [*existing, *extra], body)
        signed = self.signer.sign_http(message, audience)
        if signed.headers[: len(message.headers)] != message.headers:
            raise ClientAuthError("the signer changed header fields it should only add")
        # What the signer appended: WIT, Content-Digest, Signature-Input, Signature.
        return [*extra, *signed.headers[len(message.headers) :]]


class WimseAuth(httpx.Auth):
    """httpx auth: ``httpx.Client(auth=WimseAuth(signer))``, sync or async.

    The body is read before signing (the HTTP-signature variant covers it with
    ``Content-Digest``), so streaming uploads are buffered.
    """

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
        # raw_host: lowercased and IDNA-encoded, the form that goes on the wire.
        audience = audience_for(url.scheme, url.raw_host.decode("ascii"), url.port, raw)
        existing = list(request.headers.multi_items())
        body = request.content or None
        added = self._attacher.headers_for(request.method, audience, raw, existing, body)
        for name, value in added:
            request.headers[name] = value

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        request.read()
        self._apply(request)
        yield request

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        await request.aread()
        # A TPM signature takes a millisecond or more, an agent call a round
        # trip: keep both off the event loop.
        await anyio.to_thread.run_sync(self._apply, request)
        yield request


class WimseRequestsAuth(_RequestsAuthBase):
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
        if r.url is None or r.method is None:
            raise ClientAuthError("the request is not prepared")
        parts = urlsplit(r.url)
        raw = parts.path or "/"
        target = raw + (f"?{parts.query}" if parts.query else "")
        audience = audience_for(parts.scheme, parts.hostname or "", parts.port, raw)
        body = r.body
        if isinstance(body, str):
            # Sign the bytes that will be sent: fix the encoding here rather than
            # leave it to http.client (which would pick Latin-1).
            body = body.encode("utf-8")
            r.body = body
            r.headers["Content-Length"] = str(len(body))
        if body is not None and not isinstance(body, bytes):
            raise ClientAuthError(
                "streaming request bodies cannot be signed; pass bytes", code="body_not_bytes"
            )
        existing = list(r.headers.items())
        for name, value in self._attacher.headers_for(r.method, audience, target, existing, body):
            r.headers[name] = value
        return r
