"""requests client auth: :class:`WimseRequestsAuth`.

Needs only the ``requests`` extra (``pip install 'custos[requests]'``); the
options and the response checks are :mod:`custos.integrations.auth`'s, where
this class is also importable.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from requests import PreparedRequest, Response
from requests.auth import AuthBase

from custos.integrations.auth import Attacher, AuthOptions, audience_for, refuse_userinfo
from custos.integrations.errors import ClientAuthError
from custos.wimse.http.message import HttpMessage


class WimseRequestsAuth(AuthOptions, AuthBase):
    """requests auth: ``requests.get(url, auth=WimseRequestsAuth(signer))``.

    Responses are checked in a ``response`` hook, so a refused one raises from
    ``requests.get(...)``; their bodies are read there (``stream=True`` too).
    """

    def __call__(self, r: PreparedRequest) -> PreparedRequest:
        if r.url is None or r.method is None:
            raise ClientAuthError("the request is not prepared")
        try:
            parts = urlsplit(r.url)
        except ValueError as e:  # "Invalid IPv6 URL": requests prepared it, urlsplit cannot
            raise ClientAuthError("the request URL is not usable", code="bad_url") from e
        refuse_userinfo("@" in parts.netloc)
        raw = parts.path or "/"
        target = raw + (f"?{parts.query}" if parts.query else "")
        try:
            port = parts.port
        except ValueError as e:  # a port out of range or not a number
            raise ClientAuthError("the URL's port is not usable", code="bad_url") from e
        audience = audience_for(parts.scheme, parts.hostname or "", port, raw)
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
        added, signed = self._attacher.headers_for(r.method, audience, target, existing, body)
        for name, value in added:
            r.headers[name] = value
        if signed is not None:
            r.hooks.setdefault("response", []).append(_ResponseHook(self._attacher, signed))
        return r


class _ResponseHook:
    """A requests ``response`` hook bound to the signed request it answers."""

    def __init__(self, attacher: Attacher, signed: HttpMessage) -> None:
        self._attacher = attacher
        self._signed = signed

    def __call__(self, response: Response, *args: Any, **kwargs: Any) -> None:
        raw_headers = getattr(response.raw, "headers", None)
        # urllib3's header dict keeps repeated fields apart; requests' own
        # merges them with ", ", which is what a fallback can offer.
        items = getattr(raw_headers, "items", None)
        headers = list(items()) if items is not None else list(response.headers.items())
        self._attacher.check_response(self._signed, response.status_code, headers, response.content)


__all__ = ["WimseRequestsAuth"]
