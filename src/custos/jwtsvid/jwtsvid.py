"""JWT-SVIDs (SPIFFE JWT-SVID spec): minting and validation, on joserfc.

Validation order (each step raises its own error class):

1. compact JWS structure, header JSON (``jwt_malformed``);
2. ``alg`` in the allowlist — asymmetric algorithms only, so ``none`` and
   HMAC-with-the-public-key confusion never reach a key (``jwt_bad_alg``);
3. ``typ`` absent, ``JWT`` or ``JOSE``; no ``crit``/``b64`` extensions;
4. ``kid`` present (``jwt_unknown_kid``);
5. ``sub`` a SPIFFE ID (``jwt_bad_subject``); the bundle of *its* trust
   domain (``jwt_untrusted_domain``) holds ``kid`` with ``use`` absent or
   ``jwt-svid`` (``jwt_unknown_kid``) — a key of another trust domain, or a
   WIT-SVID key, never validates a JWT-SVID;
6. signature (``jwt_bad_signature``), with the key's own algorithm only;
7. ``exp`` required and not passed, ``nbf`` if present reached, both with
   ``leeway`` (``jwt_expired`` / ``jwt_not_yet_valid``);
8. ``aud`` required and containing the expected audience (``jwt_bad_audience``).

joserfc does the JWS parsing and signature math; the claim checks are written
here because the SPIFFE rules (kid lookup by the subject's trust domain,
``use`` filtering, exact error classes) are not what a generic claims registry
expresses.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jws, jwt
from joserfc.errors import (
    InvalidKeyCurveError,
    InvalidKeyLengthError,
    InvalidKeyTypeError,
    JoseError,
    UnsupportedKeyUseError,
)
from joserfc.jwk import ECKey, OKPKey, RSAKey

from custos.bundle.bundle import USE_JWT_SVID, BundleSet, JwtAuthority
from custos.identity.errors import InvalidIdentifierError
from custos.identity.ids import SpiffeId
from custos.jwtsvid.errors import (
    JwtAudienceError,
    JwtBadAlgorithmError,
    JwtBadSignatureError,
    JwtBadSubjectError,
    JwtExpiredError,
    JwtMalformedError,
    JwtMintError,
    JwtMissingClaimError,
    JwtNotYetValidError,
    JwtUnknownKeyError,
    JwtUntrustedDomainError,
)
from custos.keys.jose import JoseKey

#: Every algorithm the JWT-SVID spec allows (section 2.1: RFC 7518 sections 3.3-3.5,
#: that is RS*, ES* and PS*; any other ``alg`` MUST be rejected). EdDSA is not
#: among them, so it is refused on both sides even where WITs allow it.
ASYMMETRIC_ALGORITHMS = frozenset(
    {"ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
)
DEFAULT_ALGORITHMS: tuple[str, ...] = (
    "ES256",
    "ES384",
    "ES512",
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
)
DEFAULT_LEEWAY = timedelta(seconds=30)
#: A JWT-SVID is a few hundred bytes; bound what we parse from a caller.
MAX_TOKEN_LENGTH = 64 * 1024
#: Claims mint_jwt_svid sets itself; extra_claims may not override them.
RESERVED_CLAIMS = frozenset({"sub", "aud", "exp", "iat", "jti", "nbf"})


@dataclass(frozen=True)
class JwtSvid:
    """A validated JWT-SVID."""

    spiffe_id: SpiffeId
    audience: tuple[str, ...]
    expiry: datetime
    claims: Mapping[str, Any] = field(compare=False)
    token: str = field(repr=False)


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("'now' must be timezone-aware")
    return now


def _check_algorithms(algorithms: Collection[str]) -> frozenset[str]:
    allowed = frozenset(algorithms)
    # A caller listing HS256 or none would reopen the attacks this module
    # exists to stop; that is a programming error, not a token failure.
    bad = allowed - ASYMMETRIC_ALGORITHMS
    if bad:
        raise ValueError(
            f"not allowed for JWT-SVIDs: {sorted(bad)}; choose from {sorted(ASYMMETRIC_ALGORITHMS)}"
        )
    if not allowed:
        raise ValueError("algorithms must not be empty")
    return allowed


def _audience_list(audience: Sequence[str] | str) -> list[str]:
    # A bare str is itself a Sequence[str]; never split it into characters.
    values = [audience] if isinstance(audience, str) else list(audience)
    if not values:
        raise ValueError("a JWT-SVID needs at least one audience")
    for value in values:
        if not isinstance(value, str) or not value:
            raise ValueError(f"audience values must be non-empty strings, got {value!r:.40}")
    return values


def mint_jwt_svid(
    signing_key: JoseKey,
    alg: str,
    kid: str,
    spiffe_id: SpiffeId,
    audience: Sequence[str],
    ttl: timedelta,
    *,
    now: datetime | None = None,
    jti: bool = False,
    extra_claims: Mapping[str, Any] | None = None,
) -> str:
    """Sign a JWT-SVID for ``spiffe_id``.

    ``signing_key`` is a joserfc key, e.g. ``custos.keys.jose.joserfc_key(store.get(name))``
    for a key held in a device.  A single audience is written as a string,
    several as an array (as go-jose, hence SPIRE, does).
    """
    if alg not in ASYMMETRIC_ALGORITHMS:
        raise ValueError(f"alg {alg!r} is not allowed for JWT-SVIDs")
    if not isinstance(kid, str) or not kid:
        raise ValueError("kid must be a non-empty string")
    if not isinstance(spiffe_id, SpiffeId):
        raise ValueError(f"spiffe_id must be a SpiffeId, not {type(spiffe_id).__name__}")
    if not spiffe_id.path:
        raise ValueError("a JWT-SVID names a workload: spiffe_id needs a path")
    aud = _audience_list(audience)
    if ttl <= timedelta(0):
        raise ValueError("ttl must be positive")
    issued = _utc(now)
    claims: dict[str, Any] = {}
    if extra_claims:
        clash = RESERVED_CLAIMS & set(extra_claims)
        if clash:
            raise ValueError(f"extra_claims may not set {sorted(clash)}")
        claims.update(extra_claims)
    claims.update(
        {
            "sub": str(spiffe_id),
            "aud": aud[0] if len(aud) == 1 else aud,
            "exp": int((issued + ttl).timestamp()),
            "iat": int(issued.timestamp()),
        }
    )
    if jti:
        claims["jti"] = secrets.token_urlsafe(16)
    header = {"typ": "JWT", "alg": alg, "kid": kid}
    try:
        return jwt.encode(header, claims, signing_key, algorithms=[alg])
    except (JoseError, ValueError, TypeError) as e:
        raise JwtMintError(f"cannot sign a JWT-SVID with {alg}: {e}") from e


def _joserfc_public_key(authority: JwtAuthority) -> JoseKey:
    key = authority.public_key
    if isinstance(key, ec.EllipticCurvePublicKey):
        return ECKey.import_key(key)
    if isinstance(key, rsa.RSAPublicKey):
        return RSAKey.import_key(key)
    return OKPKey.import_key(key)


# 9999-12-31T23:59:59Z: the last instant a datetime can hold.
_MAX_NUMERIC_DATE = 253402300799


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise JwtMalformedError(f"claim {name!r} must be a number")
    number = float(value) if not isinstance(value, int) or abs(value) < 2**63 else math.inf
    # NaN compares false with everything (an "unexpired" NaN exp), and dates past
    # year 9999 cannot become datetimes: both are malformed, not valid.
    if not math.isfinite(number) or not 0 <= number <= _MAX_NUMERIC_DATE:
        raise JwtMalformedError(f"claim {name!r} is not a usable NumericDate")
    return number


def validate_jwt_svid(
    token: str,
    audience: str,
    bundles: BundleSet,
    *,
    now: datetime | None = None,
    leeway: timedelta = DEFAULT_LEEWAY,
    algorithms: Collection[str] = DEFAULT_ALGORITHMS,
) -> JwtSvid:
    """Validate a JWT-SVID for ``audience`` against the JWT authorities in ``bundles``."""
    allowed = _check_algorithms(algorithms)
    if not isinstance(audience, str) or not audience:
        raise ValueError("audience must be a non-empty string")
    if leeway < timedelta(0):
        raise ValueError("leeway must not be negative")
    current = _utc(now)

    # 1. structure
    if not isinstance(token, str):
        raise JwtMalformedError(f"token must be a string, not {type(token).__name__}")
    if len(token) > MAX_TOKEN_LENGTH:
        raise JwtMalformedError(f"token is longer than {MAX_TOKEN_LENGTH} characters")
    try:
        obj = jws.extract_compact(token.encode("ascii"))
        header = obj.headers()
    except (JoseError, ValueError, TypeError, RecursionError) as e:  # deep nesting: an attack
        raise JwtMalformedError(f"not a compact JWS: {e}") from e

    # 2. algorithm, before any key is touched
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in allowed:
        raise JwtBadAlgorithmError(f"algorithm {alg!r:.40} is not allowed")

    # 3. header extensions
    typ = header.get("typ")
    if typ is not None and typ not in ("JWT", "JOSE"):
        raise JwtMalformedError(f"typ must be JWT or JOSE, not {typ!r:.40}")
    if "crit" in header or "b64" in header:
        raise JwtMalformedError("critical header extensions are not supported")

    # 4. kid
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise JwtUnknownKeyError("token header has no 'kid'")

    # 5. subject -> trust domain -> key
    try:
        claims = json.loads(obj.payload)
    except (ValueError, TypeError, RecursionError) as e:  # deep nesting is an attack
        raise JwtMalformedError(f"payload is not JSON: {e}") from e
    if not isinstance(claims, dict):
        raise JwtMalformedError("payload is not a JSON object")
    sub = claims.get("sub")
    if sub is None:
        raise JwtMissingClaimError("token has no 'sub' claim")
    if not isinstance(sub, str):
        raise JwtBadSubjectError("'sub' must be a string")
    try:
        spiffe_id = SpiffeId.parse(sub)
    except InvalidIdentifierError as e:
        raise JwtBadSubjectError(f"'sub' is not a SPIFFE ID: {e.message}") from e
    if not spiffe_id.path:
        # The trust domain's own ID names no workload (JWT-SVID 3: sub is the
        # workload's SPIFFE ID); accepting it would let a token for "the
        # domain" pass policies written for members of the domain.
        raise JwtBadSubjectError("'sub' is a trust domain ID, not a workload's SPIFFE ID")
    bundle = bundles.get(spiffe_id.trust_domain)
    if bundle is None:
        raise JwtUntrustedDomainError(
            f"no trust bundle for trust domain {spiffe_id.trust_domain.name!r}"
        )
    authority = bundle.jwt_authority(kid, use=USE_JWT_SVID)
    if authority is None:
        raise JwtUnknownKeyError(
            f"kid {kid!r:.80} is not a JWT-SVID authority of {spiffe_id.trust_domain.name!r}"
        )
    if authority.alg is not None and authority.alg != alg:
        raise JwtBadAlgorithmError(f"key {kid!r:.80} is for {authority.alg}, token uses {alg}")

    # 6. signature
    try:
        valid = jws.validate_compact(obj, _joserfc_public_key(authority), algorithms=[alg])
    except (InvalidKeyTypeError, InvalidKeyCurveError, InvalidKeyLengthError) as e:
        raise JwtBadAlgorithmError(f"algorithm {alg} does not fit key {kid!r:.80}: {e}") from e
    except UnsupportedKeyUseError as e:  # pragma: no cover - we import keys without `use`
        raise JwtUnknownKeyError(str(e)) from e
    except (JoseError, ValueError, TypeError) as e:
        raise JwtBadSignatureError(f"signature check failed: {e}") from e
    if not valid:
        raise JwtBadSignatureError("signature does not verify")

    # 7. time
    now_ts = current.timestamp()
    slack = leeway.total_seconds()
    exp = _number(claims, "exp")
    if exp is None:
        raise JwtMissingClaimError("token has no 'exp' claim")
    if now_ts - slack >= exp:
        raise JwtExpiredError("token has expired")
    nbf = _number(claims, "nbf")
    if nbf is not None and now_ts + slack < nbf:
        raise JwtNotYetValidError("token is not valid yet (nbf)")

    # 8. audience
    aud = claims.get("aud")
    if aud is None:
        raise JwtMissingClaimError("token has no 'aud' claim")
    audiences = [aud] if isinstance(aud, str) else aud
    if (
        not isinstance(audiences, list)
        or not audiences
        or not all(isinstance(a, str) for a in audiences)
    ):
        raise JwtMalformedError("'aud' must be a string or a non-empty array of strings")
    if audience not in audiences:
        raise JwtAudienceError(f"token is not for audience {audience!r:.80}")

    return JwtSvid(
        spiffe_id=spiffe_id,
        audience=tuple(audiences),
        expiry=datetime.fromtimestamp(exp, UTC),
        claims=MappingProxyType(claims),
        token=token,
    )


__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "DEFAULT_ALGORITHMS",
    "DEFAULT_LEEWAY",
    "JwtSvid",
    "mint_jwt_svid",
    "validate_jwt_svid",
]
