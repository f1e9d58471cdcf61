"""Server half of ``gcp_iit``: verifies a GCE instance identity token.

1. the payload (``{"v": 1}``), then one challenge: a fresh audience
   ``<audience>/<nonce>`` (128 random bits) the token must be minted for;
2. the answer: a compact JWS strictly decoded by custos' JOSE core and its header
   judged before any key is looked up or fetched (``alg`` ``RS256``, no ``crit``,
   ``jwk``, ``jku``, ``x5u``, ``x5c``, a ``kid``: ``gcp_iit_token_invalid``; the
   shared steps of :mod:`.._jwks`, decision 0115), then its RS256 signature verified
   against Google's JWKS — a file (``jwks_file``, read at configure) or an https URL
   (``jwks_url``, fetched on first use, cached ``jwks_cache_seconds``, refetched for an
   unknown ``kid`` at most every ``jwks_refetch_seconds``; 10 s and 64 KiB bounds) —
   ``gcp_iit_signature_invalid`` otherwise;
3. claims: ``iss`` is ``https://accounts.google.com``; ``aud`` is exactly the
   challenged audience (``gcp_iit_audience_mismatch``); ``exp`` in the future and
   ``iat`` and ``nbf`` not in it (60 s leeway; ``gcp_iit_token_expired``); ``sub``,
   ``jti`` strings where present;
   ``google.compute_engine`` carries ``project_id``, ``zone``, ``instance_id`` and
   ``instance_name`` of their GCE shapes (``gcp_iit_token_invalid``); the project is
   on ``project_allowlist`` (``gcp_iit_project_not_allowed``);
4. :class:`AttestedNode` named ``<project>/<instance id>`` with selectors
   ``project-id``, ``zone``, ``instance-name`` and ``sa`` (the token's ``email``).

The token is bound to this attestation by the nonce in its audience, so a token seen
elsewhere cannot be replayed here; the half therefore re-attests
(``supports_reattestation`` is true, decision 0087).
"""

from __future__ import annotations

import logging
import math
import re
import secrets
import ssl
import time
from collections.abc import AsyncGenerator, Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from custos.errors import CustosError
from custos.plugin.protocols import AttestedNode, Challenge, CoreConfig
from custos_attestors.node._jwks import (
    JwksError,
    JwksSource,
    TokenRefusedError,
    check_url,
    decode_rs256,
    parse_rsa_jwks,
    verify_rs256,
)
from custos_attestors.node.gcp_iit import wire

NAME = "gcp_iit"
ISSUER = "https://accounts.google.com"
log = logging.getLogger(__name__)

_SETTINGS = {
    "datastore",  # the server hands every node attestor its Datastore; unused here
    "audience",
    "project_allowlist",
    "jwks_file",
    "jwks_url",
    "jwks_ca_bundle",
    "jwks_cache_seconds",
    "jwks_refetch_seconds",
}
MAX_JWKS_BYTES = 64 * 1024
MAX_JWKS_KEYS = 32
JWKS_TIMEOUT = 10.0
#: An unknown ``kid`` refetches the JWKS at most this often by default
#: (``jwks_refetch_seconds``): a flood of forged kids must not become a flood of fetches.
REFETCH_INTERVAL = 60.0
LEEWAY = 60

_PROJECT = re.compile(r"[a-z][a-z0-9-]{4,28}[a-z0-9]")
_ZONE = re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z]")
_INSTANCE_ID = re.compile(r"[0-9]{1,20}")
_INSTANCE_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_EMAIL = re.compile(r"[A-Za-z0-9._+-]{1,128}@[A-Za-z0-9.-]{1,128}")


class GcpIitRefusedError(CustosError):
    """The identity token was refused; ``code`` says why."""

    code = "gcp_iit_refused"


def _refuse(code: str, message: str) -> GcpIitRefusedError:
    return GcpIitRefusedError(message, code=code)


#: Google's signing keys by ``kid``.
Keys = Mapping[str, rsa.RSAPublicKey]


def parse_jwks(data: bytes, source: str = "JWKS") -> Keys:
    """Google's RS256 signing keys by ``kid`` (the shared rules of
    :func:`.._jwks.parse_rsa_jwks`: at most 32 keys, 64 KiB, RSA 2048-8192 with a kid)."""
    return parse_rsa_jwks(data, max_bytes=MAX_JWKS_BYTES, max_keys=MAX_JWKS_KEYS, what=source).keys


def _time_claim(claims: Mapping[str, Any], name: str) -> int | float | None:
    """A NumericDate claim (a finite JSON number, not a bool), None when absent."""
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not (
        isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
    ):
        raise _refuse("gcp_iit_token_invalid", f"the identity token's {name} is wrong")
    return value


def _check_claims(claims: Mapping[str, Any], audience: str) -> None:
    """``iss``, ``exp`` and ``iat`` present; ``iss`` Google's; ``exp`` not past, ``iat``
    and ``nbf`` not in the future (:data:`LEEWAY`); ``sub``, ``jti`` strings and ``aud``
    a string or a list of strings where present; then ``aud`` exactly ``audience``."""
    for name in ("iss", "exp", "iat"):
        if claims.get(name) is None:
            raise _refuse("gcp_iit_token_invalid", f"the identity token's {name} is wrong")
    if claims["iss"] != ISSUER:
        raise _refuse("gcp_iit_token_invalid", "the identity token's iss is wrong")
    now = int(time.time())
    exp, iat, nbf = (_time_claim(claims, n) for n in ("exp", "iat", "nbf"))
    assert exp is not None and iat is not None
    if exp <= now - LEEWAY:
        raise _refuse("gcp_iit_token_expired", "the identity token has expired")
    if iat > now + LEEWAY:
        raise _refuse("gcp_iit_token_invalid", "the identity token's iat is wrong")
    if nbf is not None and nbf > now + LEEWAY:
        raise _refuse("gcp_iit_token_invalid", "the identity token's nbf is wrong")
    for name in ("sub", "jti"):
        if name in claims and not isinstance(claims[name], str):
            raise _refuse("gcp_iit_token_invalid", f"the identity token's {name} is wrong")
    aud = claims.get("aud")
    if "aud" in claims and not (
        isinstance(aud, str) or (isinstance(aud, list) and all(isinstance(a, str) for a in aud))
    ):
        raise _refuse("gcp_iit_token_invalid", "the identity token's aud is wrong")
    if aud != audience:
        raise _refuse(
            "gcp_iit_audience_mismatch",
            "the identity token was not minted for this attestation's audience",
        )


def _jwks_source(config: Mapping[str, object]) -> JwksSource[Keys]:
    """Google's signing keys: a fixed file, or an https URL cached and refreshed
    (:class:`.._jwks.JwksSource`; a stale set is not served)."""
    file, url = config.get("jwks_file"), config.get("jwks_url")
    if (file is None) == (url is None):
        raise ValueError("gcp_iit needs exactly one of jwks_file and jwks_url")
    cache = config.get("jwks_cache_seconds", 3600)
    if isinstance(cache, bool) or not isinstance(cache, int | float) or not 1 <= cache <= 86400:
        raise ValueError("jwks_cache_seconds must be a number from 1 to 86400")
    refetch = config.get("jwks_refetch_seconds", REFETCH_INTERVAL)
    if (
        isinstance(refetch, bool)
        or not isinstance(refetch, int | float)
        or not 0 <= refetch <= 3600
    ):
        raise ValueError("jwks_refetch_seconds must be a number from 0 to 3600")
    common: dict[str, Any] = {
        "parse": lambda data: parse_jwks(data, "jwks_url" if url is not None else "jwks_file"),
        "code": "gcp_iit_jwks_unavailable",
        "max_bytes": MAX_JWKS_BYTES,
        "name": "gcp_iit JWKS",
    }
    try:
        if file is not None:
            if {"jwks_ca_bundle", "jwks_cache_seconds", "jwks_refetch_seconds"} & set(config):
                raise ValueError("the jwks_url settings do not go with jwks_file")
            return JwksSource(file=str(_absolute(file, "jwks_file")), **common)
        check_url(url, schemes=frozenset({"https"}))
        assert isinstance(url, str)
        bundle = config.get("jwks_ca_bundle")
        if bundle is not None:
            ca = _absolute(bundle, "jwks_ca_bundle")
            try:
                context = ssl.create_default_context(cafile=str(ca))
            except (OSError, ssl.SSLError) as e:
                raise ValueError(f"jwks_ca_bundle: cannot load {ca}: {e}") from None
        else:
            context = ssl.create_default_context()
        return JwksSource(
            url=url,
            cache_seconds=float(cache),
            refetch_seconds=float(refetch),
            serve_stale_seconds=0.0,
            timeout=JWKS_TIMEOUT,
            ssl_context=context,
            **common,
        )
    except JwksError as e:
        raise ValueError(e.message) from None


def _absolute(value: object, name: str) -> Path:
    if not isinstance(value, str) or not Path(value).is_absolute():
        raise ValueError(f"{name} must be an absolute path")
    return Path(value)


def _claim(claims: Mapping[str, Any], name: str, shape: re.Pattern[str]) -> str:
    value = claims.get(name)
    if not isinstance(value, str) or not shape.fullmatch(value):
        raise _refuse(
            "gcp_iit_token_invalid", f"google.compute_engine.{name} is missing or malformed"
        )
    return value


class GcpIitServerAttestor:
    """The ``gcp_iit`` node attestor, server half (see the module docstring)."""

    def __init__(self) -> None:
        self._audience = ""
        self._projects: frozenset[str] = frozenset()
        self._jwks: JwksSource[Keys] | None = None

    @property
    def supports_reattestation(self) -> bool:
        # Each token is minted for this attestation's nonce: fresh evidence.
        return True

    def configure(self, config: Mapping[str, object], core: CoreConfig) -> None:
        unknown = set(config) - _SETTINGS
        if unknown:
            raise ValueError(f"unknown gcp_iit settings: {', '.join(sorted(unknown))}")
        self._audience = wire.check_audience_prefix(config.get("audience", "custos"))
        projects = config.get("project_allowlist")
        if not isinstance(projects, list | tuple) or not projects:
            raise ValueError("gcp_iit needs 'project_allowlist': a non-empty list of project IDs")
        for project in projects:
            if not isinstance(project, str) or not _PROJECT.fullmatch(project):
                raise ValueError(f"project_allowlist: {project!r} is not a GCP project ID")
        self._projects = frozenset(projects)
        self._jwks = _jwks_source(config)

    async def verify(self, token: str, audience: str) -> tuple[list[str], list[str]]:
        """(agent path, selector values) of a token minted for ``audience``."""
        source = self._jwks
        assert source is not None
        try:
            # One strict decode; alg, key-choosing headers and kid are judged before
            # any key is looked up or fetched.
            jws, kid = decode_rs256(token, max_length=wire.MAX_TOKEN_CHARS)
        except TokenRefusedError:
            raise _refuse("gcp_iit_token_invalid", "the identity token is malformed") from None
        keys = source.current()
        if keys is None:
            keys = await source.get()
        if kid not in keys:
            # Google rotated its keys (or a forger names a kid): refetch, rate-limited.
            keys = await source.get(unknown_kid=True)
        try:
            claims = verify_rs256(jws, kid, keys)
        except TokenRefusedError as e:
            message = (
                "the identity token's key is not in the JWKS"
                if e.reason == "unknown_key"
                else "the identity token is not signed by Google's keys"
            )
            raise _refuse("gcp_iit_signature_invalid", message) from None
        _check_claims(claims, audience)
        gce = (
            claims.get("google", {}).get("compute_engine")
            if isinstance(claims.get("google"), dict)
            else None
        )
        if not isinstance(gce, dict):
            raise _refuse(
                "gcp_iit_token_invalid",
                "the identity token has no google.compute_engine claims (format=full)",
            )
        project = _claim(gce, "project_id", _PROJECT)
        if project not in self._projects:
            raise _refuse(
                "gcp_iit_project_not_allowed", f"project {project} is not on the project allowlist"
            )
        zone = _claim(gce, "zone", _ZONE)
        instance_id = _claim(gce, "instance_id", _INSTANCE_ID)
        name = _claim(gce, "instance_name", _INSTANCE_NAME)
        selectors = [f"project-id:{project}", f"zone:{zone}", f"instance-name:{name}"]
        email = claims.get("email")
        if isinstance(email, str) and _EMAIL.fullmatch(email):
            selectors.append(f"sa:{email}")
        return [project, instance_id], selectors

    async def attest(self, payload: bytes) -> AsyncGenerator[Challenge | AttestedNode, bytes]:
        if self._jwks is None:
            raise RuntimeError("gcp_iit is not configured")
        wire.decode_hello(payload)
        audience = wire.challenge_audience(self._audience, secrets.token_urlsafe(16))
        answer = yield Challenge(wire.encode_challenge(audience))
        path, selectors = await self.verify(wire.decode_token(answer), audience)
        yield AttestedNode(agent_path=path, selectors=selectors)

    def close(self) -> None:
        self._jwks = None
