"""A fake Azure Instance Metadata Service and Azure AD key endpoint, for tests and benches.

Azure cannot run here, so :class:`FakeAzure` is a small HTTP server on loopback (a
:class:`custos.testing.local_http.StartableFake`) that speaks the real wire shapes:

- ``GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=<r>`` with
  ``Metadata: true``: IMDS's managed-identity token answer (``access_token``,
  ``expires_in``, ``expires_on``, ``resource``, ``token_type``...), 400 without the header
  or the api-version, as IMDS does;
- ``GET /common/discovery/keys``: the JWKS (``kty``/``use``/``kid``/``n``/``e``/``x5t``).

Tokens are RS256 JWTs with Azure AD v1 access-token claims (``iss``
``https://sts.windows.net/<tid>/``, ``tid``, ``oid`` = ``sub``, ``xms_mirid``, ...) signed
by an RSA key this object makes; :meth:`FakeAzure.mint` makes any variant a test needs
(another key, tenant, audience, expired...). ``mode`` makes IMDS misbehave: ``"hang"``
(never answers until the server stops), ``"garbage"``, ``"oversized"``, ``"status:<n>"``;
``fail_first`` answers that many requests with HTTP 500 first.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from custos.testing.local_http import QuietHandler, StartableFake

IMDS_PATH = "/metadata/identity/oauth2/token"
JWKS_PATH = "/common/discovery/keys"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _uint(n: int) -> str:
    return _b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))


class SigningKey:
    """An RSA key and its ``kid``."""

    def __init__(self, kid: str | None = None, bits: int = 2048) -> None:
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        self.kid = kid or _b64(uuid.uuid4().bytes)

    def jwk(self) -> dict[str, str]:
        numbers = self.private.public_key().public_numbers()
        return {
            "kty": "RSA",
            "use": "sig",
            "kid": self.kid,
            "x5t": self.kid,
            "n": _uint(numbers.n),
            "e": _uint(numbers.e),
        }

    def sign(self, header: Mapping[str, Any], claims: Mapping[str, Any]) -> str:
        head = _b64(json.dumps(header, separators=(",", ":")).encode())
        body = _b64(json.dumps(claims, separators=(",", ":")).encode())
        signature = self.private.sign(
            f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256()
        )
        return f"{head}.{body}.{_b64(signature)}"


def jwks_of(*keys: SigningKey) -> dict[str, list[dict[str, str]]]:
    return {"keys": [k.jwk() for k in keys]}


class FakeAzure(StartableFake):
    """One tenant's managed identity on one VM, and the keys that sign its tokens."""

    thread_name = "fake-azure"

    def __init__(
        self,
        *,
        tenant: str | None = None,
        subscription: str | None = None,
        resource_group: str = "rg-custos",
        vm_name: str = "vm-1",
        principal: str | None = None,
        lifetime: int = 3600,
    ) -> None:
        self.tenant = tenant or str(uuid.uuid4())
        self.subscription = subscription or str(uuid.uuid4())
        self.resource_group = resource_group
        self.vm_name = vm_name
        self.principal = principal or str(uuid.uuid4())
        self.lifetime = lifetime
        self.key = SigningKey()
        #: Keys served in the JWKS (a test may add a rolled key).
        self.published: list[SigningKey] = [self.key]
        self.mode = "ok"
        self.fail_first = 0
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.jwks_requests = 0
        super().__init__()

    # -- tokens --
    @property
    def mirid(self) -> str:
        return (
            f"/subscriptions/{self.subscription}/resourcegroups/{self.resource_group}"
            f"/providers/Microsoft.Compute/virtualMachines/{self.vm_name}"
        )

    def claims(self, resource: str = "https://management.azure.com/") -> dict[str, Any]:
        now = int(time.time())
        return {
            "aud": resource,
            "iss": f"https://sts.windows.net/{self.tenant}/",
            "iat": now - 5,
            "nbf": now - 5,
            "exp": now + self.lifetime,
            "aio": _b64(uuid.uuid4().bytes),
            "appid": str(uuid.uuid4()),
            "appidacr": "2",
            "idp": f"https://sts.windows.net/{self.tenant}/",
            "idtyp": "app",
            "oid": self.principal,
            "rh": _b64(uuid.uuid4().bytes),
            "sub": self.principal,
            "tid": self.tenant,
            "uti": _b64(uuid.uuid4().bytes),
            "ver": "1.0",
            "xms_mirid": self.mirid,
            "xms_tcdt": 1600000000,
        }

    def mint(
        self,
        resource: str = "https://management.azure.com/",
        *,
        key: SigningKey | None = None,
        header: Mapping[str, Any] | None = None,
        drop: tuple[str, ...] = (),
        **overrides: Any,
    ) -> str:
        """A token as IMDS would hand out, with ``overrides`` applied to the claims,
        ``drop`` claims removed, signed by ``key`` (default: the published key)."""
        signer = key or self.key
        claims = {**self.claims(resource), **overrides}
        for name in drop:
            claims.pop(name, None)
        head = {
            "typ": "JWT",
            "alg": "RS256",
            "x5t": signer.kid,
            "kid": signer.kid,
            **(header or {}),
        }
        return signer.sign(head, claims)

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        return jwks_of(*self.published)

    def write_jwks(self, path: Path) -> str:
        path.write_text(json.dumps(self.jwks()), encoding="utf-8")
        return str(path)

    # -- the HTTP server --
    @property
    def endpoint(self) -> str:
        return self.base_url + IMDS_PATH

    @property
    def jwks_url(self) -> str:
        return self.base_url + JWKS_PATH

    def handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(QuietHandler):
            disable_nagle_algorithm = True  # as IMDS

            def _send(self, status: int, body: bytes) -> None:
                self.send(status, body, {"Content-Type": "application/json", "Connection": "close"})

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                if url.path == JWKS_PATH:
                    fake.jwks_requests += 1
                    self._send(200, json.dumps(fake.jwks()).encode())
                    return
                if url.path != IMDS_PATH:
                    self._send(404, b'{"error":"not_found"}')
                    return
                fake.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                query = parse_qs(url.query)
                if self.headers.get("Metadata") != "true":
                    self._send(
                        400,
                        b'{"error":"invalid_request",'
                        b'"error_description":"Required metadata header not specified"}',
                    )
                    return
                if (
                    query.get("api-version") != ["2018-02-01"]
                    or len(query.get("resource", [])) != 1
                ):
                    self._send(
                        400,
                        b'{"error":"invalid_request",'
                        b'"error_description":"bad api-version or resource"}',
                    )
                    return
                if fake.fail_first > 0:
                    fake.fail_first -= 1
                    self._send(500, b'{"error":"unknown_error"}')
                    return
                mode = fake.mode
                if mode == "hang":
                    fake.stopping.wait(60)
                    return
                if mode == "garbage":
                    self.wfile.write(b"\x00\xffnot http at all\r\n\r\n")
                    self.close_connection = True
                    return
                if mode == "oversized":
                    self._send(200, b'{"access_token":"' + b"a" * (1 << 20) + b'"}')
                    return
                if mode.startswith("status:"):
                    self._send(int(mode.split(":", 1)[1]), b'{"error":"test"}')
                    return
                resource = query["resource"][0]
                token = fake.mint(resource)
                now = int(time.time())
                body = {
                    "access_token": token,
                    "client_id": str(uuid.uuid4()),
                    "expires_in": str(fake.lifetime),
                    "expires_on": str(now + fake.lifetime),
                    "ext_expires_in": str(fake.lifetime),
                    "not_before": str(now),
                    "resource": resource,
                    "token_type": "Bearer",
                }
                self._send(200, json.dumps(body).encode())

        return Handler


__all__ = ["IMDS_PATH", "JWKS_PATH", "FakeAzure", "SigningKey", "jwks_of"]
