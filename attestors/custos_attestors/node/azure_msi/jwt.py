"""RS256 JWT verification against a JWKS, by hand on ``cryptography``.

Only what Azure AD access tokens use: a compact JWS, header ``alg`` = ``RS256`` with a
``kid``, an RSA key (2048 bits or more) of that ``kid`` in the key set. Anything else
(``none``, HS256, an embedded ``jwk``/``jku``/``x5u``, ``crit``) is refused before a key is
looked up, so no header can choose the key or the algorithm.

Key sets come from a file (read at configure time) or a URL (fetched with a bounded
read and timeout, cached for ``refresh`` seconds, fetched again at most every
``MIN_REFETCH`` seconds when a token names a ``kid`` the cache lacks: Azure rolls keys).
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from custos._files import UnreadableFileError, read_small_file
from custos.errors import CustosError

MAX_JWKS_BYTES = 256 * 1024
MAX_KEYS = 64
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192
#: A token naming an unknown kid makes the URL source fetch again at most this often.
MIN_REFETCH = 30.0


class AzureTokenError(CustosError):
    """The token is malformed or its signature does not verify; ``code`` says which."""

    code = "azure_msi_token_invalid"


class JwksError(CustosError):
    """A key set could not be read, fetched or parsed."""

    code = "azure_msi_jwks_unavailable"


def b64url(data: str, what: str) -> bytes:
    if not data or "=" in data:
        raise AzureTokenError(f"{what} is not unpadded base64url")
    try:
        return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))
    except (binascii.Error, ValueError):
        raise AzureTokenError(f"{what} is not unpadded base64url") from None


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise AzureTokenError(f"the token's {what} is not UTF-8 JSON") from None
    if not isinstance(value, dict):
        raise AzureTokenError(f"the token's {what} is not a JSON object")
    return value


def _int_of(value: object, what: str) -> int:
    if not isinstance(value, str):
        raise JwksError(f"JWKS: {what} must be a base64url string")
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise JwksError(f"JWKS: {what} is not base64url") from None
    return int.from_bytes(raw, "big")


def parse_jwks(data: bytes) -> dict[str, rsa.RSAPublicKey]:
    """The RSA signing keys of a JWKS document, by ``kid`` (other keys are skipped)."""
    if len(data) > MAX_JWKS_BYTES:
        raise JwksError(f"the JWKS is larger than {MAX_JWKS_BYTES} bytes")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise JwksError("the JWKS is not UTF-8 JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise JwksError('the JWKS must be an object with a "keys" array')
    if len(doc["keys"]) > MAX_KEYS:
        raise JwksError(f"the JWKS has more than {MAX_KEYS} keys")
    keys: dict[str, rsa.RSAPublicKey] = {}
    for jwk in doc["keys"]:
        if not isinstance(jwk, dict) or jwk.get("kty") != "RSA":
            continue
        if jwk.get("use", "sig") != "sig" or jwk.get("alg", "RS256") != "RS256":
            continue
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not 0 < len(kid) <= 256:
            raise JwksError("JWKS: every RSA key needs a kid of 1 to 256 characters")
        if kid in keys:
            raise JwksError(f"JWKS: the kid {kid!r:.80} appears twice")
        n, e = _int_of(jwk.get("n"), "n"), _int_of(jwk.get("e"), "e")
        if not MIN_RSA_BITS <= n.bit_length() <= MAX_RSA_BITS or e < 3 or e % 2 == 0:
            raise JwksError(f"JWKS: key {kid!r:.80} is not an RSA key of 2048 to 8192 bits")
        try:
            keys[kid] = rsa.RSAPublicNumbers(e, n).public_key()
        except ValueError:
            raise JwksError(f"JWKS: key {kid!r:.80} is not a valid RSA key") from None
    if not keys:
        raise JwksError("the JWKS holds no RSA signing key")
    return keys


@dataclass(frozen=True)
class VerifiedToken:
    header: Mapping[str, Any]
    claims: Mapping[str, Any]


_FORBIDDEN_HEADERS = frozenset({"crit", "jwk", "jku", "x5u", "x5c"})


def split(token: str) -> tuple[dict[str, Any], bytes, dict[str, Any], bytes]:
    """Header, signing input, claims and signature of a compact JWS (not verified)."""
    parts = token.split(".")
    if len(parts) != 3:
        raise AzureTokenError("the token is not a compact JWS (three parts)")
    header = _json_object(b64url(parts[0], "the token header"), "header")
    claims = _json_object(b64url(parts[1], "the token claims"), "claims")
    signature = b64url(parts[2], "the token signature")
    return header, f"{parts[0]}.{parts[1]}".encode("ascii"), claims, signature


def verify_rs256(
    token: str | tuple[dict[str, Any], bytes, dict[str, Any], bytes],
    keys: Mapping[str, rsa.RSAPublicKey],
) -> VerifiedToken:
    """The token's header and claims if its RS256 signature verifies with ``keys[kid]``
    (``token`` compact, or already :func:`split`)."""
    header, signing_input, claims, signature = split(token) if isinstance(token, str) else token
    if header.get("alg") != "RS256":
        raise AzureTokenError("the token is not signed with RS256", code="azure_msi_bad_algorithm")
    if _FORBIDDEN_HEADERS & set(header):
        raise AzureTokenError(
            "the token header carries crit/jwk/jku/x5u/x5c", code="azure_msi_bad_algorithm"
        )
    kid = header.get("kid")
    if not isinstance(kid, str):
        raise AzureTokenError("the token header has no kid")
    key = keys.get(kid)
    if key is None:
        raise AzureTokenError(
            f"the token's key {kid[:80]!r} is not in the trusted JWKS",
            code="azure_msi_unknown_key",
        )
    try:
        key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        raise AzureTokenError(
            "the token's signature does not verify", code="azure_msi_bad_signature"
        ) from None
    return VerifiedToken(header, claims)


class KeySource:
    """A JWKS from a file (fixed) or a URL (cached, refreshed)."""

    def __init__(
        self,
        *,
        file: str | None = None,
        url: str | None = None,
        refresh: float = 3600.0,
        timeout: float = 5.0,
    ) -> None:
        if (file is None) == (url is None):
            raise ValueError("a key source is a file or a URL")
        self.file, self.url = file, url
        self._refresh, self._timeout = refresh, timeout
        self._lock = threading.Lock()
        self._keys: dict[str, rsa.RSAPublicKey] = {}
        self._fetched = float("-inf")
        if file is not None:
            try:
                self._keys = parse_jwks(
                    read_small_file(file, max_bytes=MAX_JWKS_BYTES, what="JWKS file")
                )
            except UnreadableFileError as e:
                raise JwksError(e.message) from None

    def _fetch(self) -> None:
        assert self.url is not None
        # The scheme is checked at configure time (http or https only).
        request = urllib.request.Request(self.url, headers={"Accept": "application/json"})  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:  # noqa: S310
                data = response.read(MAX_JWKS_BYTES + 1)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise JwksError(f"cannot fetch the JWKS from {self.url}: {e}") from None
        self._keys = parse_jwks(data)
        self._fetched = time.monotonic()

    def keys(self, kid: str | None = None) -> Mapping[str, rsa.RSAPublicKey]:
        """The current keys (a URL source fetches when stale, or when ``kid`` is
        unknown and the last fetch is older than :data:`MIN_REFETCH`). Blocking: call
        it in a worker thread."""
        if self.url is None:
            return self._keys
        with self._lock:
            age = time.monotonic() - self._fetched
            if age > self._refresh or (
                kid is not None and kid not in self._keys and age > MIN_REFETCH
            ):
                try:
                    self._fetch()
                except JwksError:
                    if not self._keys:
                        raise
                    # Keep serving the cached keys through an outage of the endpoint.
            return self._keys

    def cached(self) -> Mapping[str, rsa.RSAPublicKey] | None:
        """The keys when no fetch is due (so the caller can skip a thread hop)."""
        if self.url is None:
            return self._keys
        if time.monotonic() - self._fetched <= self._refresh:
            return self._keys
        return None


__all__ = [
    "AzureTokenError",
    "JwksError",
    "KeySource",
    "VerifiedToken",
    "parse_jwks",
    "split",
    "verify_rs256",
]
