"""Local stand-ins for Google's side of the ``gcp_iit`` attestor (no pytest import).

- :class:`GcpSigner` is "Google" for a test: an RSA-2048 key with a ``kid`` that mints
  instance identity tokens shaped like GCE's ``format=full`` tokens (RS256), and its
  JWKS (what ``https://www.googleapis.com/oauth2/v3/certs`` serves).
- :class:`FakeGceMetadata` serves ``GET /computeMetadata/v1/instance/service-accounts/
  <account>/identity?audience=...&format=full`` (needs ``Metadata-Flavor: Google``:
  403 otherwise), minting a token for the audience asked.  Knobs: ``hang``,
  ``fail_first``, ``claims`` (overrides), ``audience_override``, ``signer``.
- :class:`FakeJwksServer` serves a JWKS over HTTPS with a certificate for 127.0.0.1
  issued by a CA the test trusts (:func:`custos.testing.local_tls.local_tls`).

Both are :class:`custos.testing.local_http.LocalHttpServer`.
"""

from __future__ import annotations

import json
import secrets
import time
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any

from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey

from custos.testing.local_http import LocalHttpServer, Response
from custos.testing.local_tls import LocalTls, local_tls

PROJECT = "my-project-1"
INSTANCE_ID = "4721412345678901234"
INSTANCE_NAME = "web-1"
ZONE = "us-central1-a"
EMAIL = "1234567890-compute@developer.gserviceaccount.com"


class GcpSigner:
    """A test's "Google": mints identity tokens, publishes its JWKS."""

    def __init__(self, kid: str | None = None) -> None:
        self.kid = kid or secrets.token_hex(20)
        self.key = RSAKey.generate_key(
            2048, parameters={"kid": self.kid, "use": "sig", "alg": "RS256"}
        )

    def jwks(self, *others: GcpSigner) -> dict[str, Any]:
        keys = KeySet([self.key, *(o.key for o in others)]).as_dict(private=False)
        return {"keys": keys["keys"]}

    def claims(
        self, audience: str, *, full: bool = True, now: float | None = None
    ) -> dict[str, Any]:
        issued = int(time.time() if now is None else now)
        claims: dict[str, Any] = {
            "aud": audience,
            "azp": "112233445566778899001",
            "email": EMAIL,
            "email_verified": True,
            "exp": issued + 3600,
            "iat": issued,
            "iss": "https://accounts.google.com",
            "sub": "112233445566778899001",
        }
        if full:
            claims["google"] = {
                "compute_engine": {
                    "instance_creation_timestamp": issued - 86400,
                    "instance_id": INSTANCE_ID,
                    "instance_name": INSTANCE_NAME,
                    "project_id": PROJECT,
                    "project_number": 1234567890,
                    "zone": ZONE,
                }
            }
        return claims

    def token(self, claims: dict[str, Any], *, header: dict[str, Any] | None = None) -> str:
        return jwt.encode(
            header or {"alg": "RS256", "kid": self.kid, "typ": "JWT"}, claims, self.key
        )


#: ``local_tls`` and this stay importable from here, where the gcp_iit tests find them.
TlsFiles = LocalTls


class FakeGceMetadata(LocalHttpServer):
    """The GCE metadata server's identity endpoint (see the module docstring)."""

    PREFIX = "/computeMetadata/v1/instance/service-accounts/"

    def __init__(
        self,
        signer: GcpSigner,
        *,
        hang: bool = False,
        fail_first: int = 0,
        claims: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        audience_override: str | None = None,
        body: bytes | None = None,
    ) -> None:
        self.signer = signer
        self.hang = hang
        self.fail_first = fail_first
        self.edit_claims = claims
        self.audience_override = audience_override
        self.body = body
        self.audiences: list[str] = []
        super().__init__()

    def handle(self, request: BaseHTTPRequestHandler, method: str, body: bytes) -> Response | None:
        if request.headers.get("Metadata-Flavor") != "Google":
            return Response(403, b"Missing required header: Metadata-Flavor")
        url = urllib.parse.urlsplit(request.path)
        if (
            method != "GET"
            or not url.path.startswith(self.PREFIX)
            or not url.path.endswith("/identity")
        ):
            return Response(404, b"Not Found")
        query = urllib.parse.parse_qs(url.query)
        audience = (query.get("audience") or [""])[0]
        if not audience:
            return Response(400, b"non-empty audience parameter required")
        self.audiences.append(audience)
        if self.body is not None:
            return Response(200, self.body, {"Metadata-Flavor": "Google"})
        full = (query.get("format") or [""])[0] == "full"
        claims = self.signer.claims(self.audience_override or audience, full=full)
        if self.edit_claims is not None:
            claims = self.edit_claims(claims)
        token = self.signer.token(claims)
        return Response(
            200, token.encode(), {"Metadata-Flavor": "Google", "Content-Type": "text/html"}
        )


class FakeJwksServer(LocalHttpServer):
    """``GET /oauth2/v3/certs`` over HTTPS: the JWKS of ``signers`` (changeable)."""

    def __init__(self, jwks: dict[str, Any], tls: LocalTls) -> None:
        self.jwks = jwks
        self.status = 200
        super().__init__(tls=tls.server_context())
        self.certs_url = self.url + "/oauth2/v3/certs"

    def handle(self, request: BaseHTTPRequestHandler, method: str, body: bytes) -> Response | None:
        if request.path != "/oauth2/v3/certs":
            return Response(404)
        return Response(
            self.status, json.dumps(self.jwks).encode(), {"Content-Type": "application/json"}
        )


__all__ = [
    "EMAIL",
    "INSTANCE_ID",
    "INSTANCE_NAME",
    "PROJECT",
    "ZONE",
    "FakeGceMetadata",
    "FakeJwksServer",
    "GcpSigner",
    "TlsFiles",
    "local_tls",
]
