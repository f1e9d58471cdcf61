"""httpx client auth: :class:`WimseAuth` (sync and async clients).

Needs only the ``httpx`` extra (``pip install 'custos[httpx]'``); the options
and the response checks are :mod:`custos.integrations.auth`'s, where this
class is also importable.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator

import anyio.to_thread
import httpx

from custos.integrations.auth import AuthOptions, audience_for, refuse_userinfo
from custos.wimse.http.message import HttpMessage


class WimseAuth(AuthOptions, httpx.Auth):
    """httpx auth: ``httpx.Client(auth=WimseAuth(signer))``, sync or async.

    The body is read before signing (the HTTP-signature variant covers it with
    ``Content-Digest``), so streaming uploads are buffered; when responses are
    checked, their bodies are read before the client returns them.
    See the module docstring for ``response_verifier``,
    ``require_signed_response`` and ``expected_responder``.
    """

    requires_request_body = True

    def _apply(self, request: httpx.Request) -> HttpMessage | None:
        url = request.url
        refuse_userinfo(bool(url.userinfo))
        raw = url.raw_path.decode("ascii")
        # raw_host: lowercased and IDNA-encoded, the form that goes on the wire.
        audience = audience_for(url.scheme, url.raw_host.decode("ascii"), url.port, raw)
        existing = list(request.headers.multi_items())
        body = request.content or None
        added, signed = self._attacher.headers_for(request.method, audience, raw, existing, body)
        for name, value in added:
            request.headers[name] = value
        return signed

    def _check(self, signed: HttpMessage | None, response: httpx.Response) -> None:
        self._attacher.check_response(
            signed, response.status_code, response.headers.multi_items(), response.content
        )

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        request.read()
        signed = self._apply(request)
        response = yield request
        if signed is not None:
            response.read()  # the signature covers the body
            self._check(signed, response)

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        await request.aread()
        # A TPM signature takes a millisecond or more, an agent call a round
        # trip: keep both off the event loop (and the response check, which
        # verifies a WIT and may ask a Redis replay cache).
        signed = await anyio.to_thread.run_sync(self._apply, request)
        response = yield request
        if signed is not None:
            await response.aread()  # the signature covers the body
            await anyio.to_thread.run_sync(self._check, signed, response)


__all__ = ["WimseAuth"]
