"""One JWKS source for the node attestors that verify a cloud's JWTs (``gcp_iit``,
``azure_msi``): a key set from a file or a URL, bounded, cached and refetched.

- :func:`parse_rsa_jwks`: the RS256 signing keys of a JWKS document, by ``kid``. The
  document is bounded (``max_bytes``, ``max_keys``) and strict JSON
  (:func:`custos._jose.loads_strict`); keys that are not RSA, are marked for another
  use (``use`` not ``sig``) or algorithm (``alg`` not ``RS256``), or have no ``kid``
  are skipped (no token can select them); a ``kid`` twice is refused (which key would
  it name?). Every kept key is imported by the JOSE core
  (:func:`custos._jose.import_public_jwk`: minimal encoding, exponent, no private
  members) and must have 2048 to 8192 bits.
- :class:`JwksSource`: a file (read once, at configure time, with
  :func:`custos._files.read_small_file`) or an http(s) URL, fetched with httpx on first
  use (deadline ``timeout``, ``max_bytes``, no redirects, no proxy from the
  environment), used for ``cache_seconds``, fetched again when a token names a ``kid``
  the set lacks (the cloud rolled its keys, or a forger invents kids). Attempts, failed
  ones included, are spaced by ``refetch_seconds`` (except the very first): a flood of
  forged kids or a dead endpoint costs one fetch per interval. A failed fetch keeps the
  cached set; once the set is older than ``cache_seconds`` it is still served through
  an outage for ``serve_stale_seconds`` (0: refused), counted from the last successful
  fetch. A missing or too-stale set is a refusal with the caller's ``code``; the
  fetch error is logged at WARNING.

- :func:`decode_rs256` and :func:`verify_rs256`: a cloud's RS256 JWT on custos' JOSE
  core (decision 0016): the strict compact decode (:func:`custos._jose.decode_compact`,
  one parse of header and claims), then the header judged before any key is looked up
  or fetched (``alg`` exactly ``RS256``; no ``crit``, ``jwk``, ``jku``, ``x5u``,
  ``x5c``; a string ``kid``), then the key of that ``kid`` in the trusted set and
  :func:`custos._jose.verify_signature`. No header can choose the key or the
  algorithm. Refusals are :class:`TokenRefusedError` with a ``reason`` the attestor
  maps to its own code.

Each attestor keeps its own settings and its own refusal codes; this module holds the
logic they share.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import urlsplit

import httpx
from cryptography.hazmat.primitives.asymmetric import rsa

from custos._files import UnreadableFileError, read_small_file
from custos._jose import (
    CompactJws,
    JoseError,
    b64url_decode,
    decode_compact,
    import_public_jwk,
    loads_strict,
    verify_signature,
)
from custos.errors import CustosError

log = logging.getLogger(__name__)

MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192
MAX_KID_CHARS = 256

T = TypeVar("T")


class JwksError(CustosError):
    """A key set could not be read, fetched or parsed (the caller gives the code)."""

    code = "jwks_unavailable"


@dataclass(frozen=True)
class RsaKeys:
    """The RS256 signing keys of a JWKS, by ``kid``."""

    keys: Mapping[str, rsa.RSAPublicKey]


def parse_rsa_jwks(data: bytes, *, max_bytes: int, max_keys: int, what: str = "JWKS") -> RsaKeys:
    """The RS256 signing keys of the JWKS document ``data`` (see the module docstring);
    :class:`JwksError` if it is too large, malformed, or holds none."""
    if len(data) > max_bytes:
        raise JwksError(f"{what}: larger than {max_bytes} bytes")
    try:
        document = loads_strict(data)
    except ValueError:
        raise JwksError(f"{what}: not a strict UTF-8 JSON object") from None
    entries = document.get("keys")
    if not isinstance(entries, list) or not 0 < len(entries) <= max_keys:
        raise JwksError(f'{what}: needs a "keys" array of 1 to {max_keys} keys')
    keys: dict[str, rsa.RSAPublicKey] = {}
    for jwk in entries:
        if not isinstance(jwk, dict) or jwk.get("kty") != "RSA":
            continue
        if jwk.get("use", "sig") != "sig" or jwk.get("alg", "RS256") != "RS256":
            continue
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not 0 < len(kid) <= MAX_KID_CHARS:
            continue
        if kid in keys:
            raise JwksError(f"{what}: the kid {kid!r:.80} appears twice")
        try:
            key = import_public_jwk(jwk)
        except JoseError as e:
            raise JwksError(
                f"{what}: key {kid!r:.80} is not an RSA key of {MIN_RSA_BITS} to "
                f"{MAX_RSA_BITS} bits ({e.message})"
            ) from None
        if not isinstance(key, rsa.RSAPublicKey) or key.key_size > MAX_RSA_BITS:
            raise JwksError(
                f"{what}: key {kid!r:.80} is not an RSA key of {MIN_RSA_BITS} to "
                f"{MAX_RSA_BITS} bits"
            )
        keys[kid] = key
    if not keys:
        raise JwksError(f"{what}: holds no RS256 signing key with a kid")
    return RsaKeys(keys)


#: Why :func:`decode_rs256` / :func:`verify_rs256` refused a token.
TokenRefusal = Literal["malformed", "bad_algorithm", "no_kid", "unknown_key", "bad_signature"]
#: Header members that would let a token choose its key or demand an extension.
FORBIDDEN_HEADERS = frozenset({"crit", "jwk", "jku", "x5u", "x5c"})


class TokenRefusedError(CustosError):
    """A cloud's RS256 JWT was refused; ``reason`` says why (:data:`TokenRefusal`), the
    message never quotes the token."""

    code = "jwt_refused"

    def __init__(self, message: str, reason: TokenRefusal) -> None:
        super().__init__(message)
        self.reason: TokenRefusal = reason


def decode_rs256(token: str, *, max_length: int) -> tuple[CompactJws, str]:
    """The strictly decoded JWS (signature NOT checked) and its ``kid``, once its header
    says RS256 and names no key, key URL or critical extension."""
    try:
        jws = decode_compact(token, max_length=max_length)
    except JoseError:
        # The core refuses a crit header as malformed; say which, as the other forbidden
        # headers are said (decoding the header again only on this error path).
        try:
            header = loads_strict(b64url_decode(token.split(".", 1)[0]))
        except ValueError:
            header = {}
        if "crit" in header:
            raise TokenRefusedError(
                "the token header carries crit/jwk/jku/x5u/x5c", "bad_algorithm"
            ) from None
        raise TokenRefusedError(
            "the token is not a strictly encoded compact JWS of JSON objects", "malformed"
        ) from None
    header = jws.header
    if header.get("alg") != "RS256":
        raise TokenRefusedError("the token is not signed with RS256", "bad_algorithm")
    if not FORBIDDEN_HEADERS.isdisjoint(header):
        raise TokenRefusedError("the token header carries crit/jwk/jku/x5u/x5c", "bad_algorithm")
    kid = header.get("kid")
    if not isinstance(kid, str):
        raise TokenRefusedError("the token header has no kid", "no_kid")
    return jws, kid


def verify_rs256(jws: CompactJws, kid: str, keys: Mapping[str, rsa.RSAPublicKey]) -> dict[str, Any]:
    """The claims of ``jws`` if its RS256 signature verifies with ``keys[kid]`` (``kid``
    from :func:`decode_rs256`)."""
    key = keys.get(kid)
    if key is None:
        raise TokenRefusedError(
            f"the token's key {kid[:80]!r} is not in the trusted JWKS", "unknown_key"
        )
    try:
        verify_signature(key, "RS256", jws.signing_input, jws.signature)
    except JoseError:
        raise TokenRefusedError("the token's signature does not verify", "bad_signature") from None
    return jws.claims


def check_url(url: object, *, schemes: frozenset[str], name: str = "jwks_url") -> str:
    """``url`` if it is an absolute URL of one of ``schemes``, with a host and no
    credentials (ValueError otherwise)."""
    wanted = " or ".join(sorted(schemes))
    if not isinstance(url, str) or len(url) > 1024:
        raise ValueError(f"{name} must be an {wanted} URL")
    try:
        parts = urlsplit(url)
        host, user = parts.hostname, parts.username
    except ValueError:
        raise ValueError(f"{name} must be an {wanted} URL") from None
    if parts.scheme not in schemes or not host or user is not None:
        raise ValueError(f"{name} must be an {wanted} URL")
    return url


class JwksSource(Generic[T]):
    """A key set from a file (fixed) or a URL (cached, refetched); see the module
    docstring. ``parse`` turns the document's bytes into the caller's key set
    (raising :class:`JwksError` or ``ValueError``); ``code`` is the refusal code of a
    set that cannot be had."""

    def __init__(
        self,
        *,
        parse: Callable[[bytes], T],
        code: str,
        max_bytes: int,
        file: str | None = None,
        url: str | None = None,
        cache_seconds: float = 3600.0,
        refetch_seconds: float = 60.0,
        serve_stale_seconds: float = 0.0,
        timeout: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        name: str = "JWKS",
    ) -> None:
        if (file is None) == (url is None):
            raise ValueError("a JWKS source is a file or a URL")
        self.file, self.url = file, url
        self._parse, self._code, self._max_bytes, self._name = parse, code, max_bytes, name
        self._cache = float(cache_seconds)
        self._refetch = float(refetch_seconds)
        self._stale_ok = float(serve_stale_seconds)
        self._timeout = float(timeout)
        self._ssl = ssl_context
        self._keys: T | None = None
        #: monotonic time of the last fetch attempt (rate limit) and last success (age)
        self._fetched = -math.inf
        self._fetched_ok = -math.inf
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        if file is not None:
            try:
                data = read_small_file(file, max_bytes=max_bytes, what=f"{name} file")
            except UnreadableFileError as e:
                raise JwksError(e.message, code=code) from None
            self._keys = self._parsed(data)

    def _error(self, message: str) -> JwksError:
        return JwksError(message, code=self._code)

    def _parsed(self, data: bytes) -> T:
        try:
            return self._parse(data)
        except (JwksError, ValueError) as e:
            raise self._error(e.message if isinstance(e, JwksError) else str(e)) from None

    def current(self) -> T | None:
        """The key set when no fetch is due (no await, no lock), else None."""
        if self.url is None or time.monotonic() - self._fetched_ok <= self._cache:
            return self._keys
        return None

    def _fetch_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock

    async def _fetch(self) -> T:
        assert self.url is not None
        try:
            async with asyncio.timeout(self._timeout):
                async with httpx.AsyncClient(
                    verify=self._ssl or True,
                    trust_env=False,
                    follow_redirects=False,
                    timeout=None,  # noqa: S113 - the asyncio deadline bounds the whole fetch
                ) as client:
                    async with client.stream(
                        "GET", self.url, headers={"Accept": "application/json"}
                    ) as response:
                        if response.status_code != 200:
                            raise self._error(f"the JWKS URL answered HTTP {response.status_code}")
                        body = bytearray()
                        async for chunk in response.aiter_bytes():
                            body += chunk
                            if len(body) > self._max_bytes:
                                break
        except TimeoutError:
            raise self._error("the JWKS URL did not answer in time") from None
        except httpx.HTTPError as e:
            raise self._error(f"the JWKS URL failed: {type(e).__name__}") from None
        return self._parsed(bytes(body))

    async def get(self, *, unknown_kid: bool = False) -> T:
        """The key set: fetched when missing or older than ``cache_seconds``, or when
        ``unknown_kid`` (a token named a ``kid`` the set lacks); attempts rate-limited."""
        if self.url is None:
            assert self._keys is not None
            return self._keys
        async with self._fetch_lock():
            now = time.monotonic()
            stale = self._keys is None or now - self._fetched_ok > self._cache
            if (stale or unknown_kid) and now - self._fetched >= self._refetch:
                self._fetched = now
                try:
                    self._keys = await self._fetch()
                except JwksError as e:
                    log.warning("%s: %s (%s)", self._name, e.message, self.url)
                else:
                    self._fetched_ok, stale = now, False
            if self._keys is None:
                raise self._error(f"{self._name}: no key set (fetching it failed; see the log)")
            if stale and now - self._fetched_ok > self._cache + self._stale_ok:
                raise self._error(
                    f"{self._name}: the key set is stale (fetching it failed; see the log)"
                )
            return self._keys


__all__ = [
    "FORBIDDEN_HEADERS",
    "MAX_RSA_BITS",
    "MIN_RSA_BITS",
    "JwksError",
    "JwksSource",
    "RsaKeys",
    "TokenRefusal",
    "TokenRefusedError",
    "check_url",
    "decode_rs256",
    "parse_rsa_jwks",
    "verify_rs256",
]
