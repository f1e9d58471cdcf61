"""JWT-SVIDs (SPIFFE JWT-SVID spec): minting (joserfc, so a device key signs)
and validation (the strict JOSE core, :mod:`custos._jose`).

Validation order (each step raises its own error class):

1. compact JWS structure, strict base64url, strict JSON — duplicate members at
   any level, NaN / Infinity, lone surrogates, deep nesting refused — and no
   ``crit`` (``jwt_malformed``);
2. ``alg`` in the allowlist — asymmetric algorithms only, so ``none`` and
   HMAC-with-the-public-key confusion never reach a key (``jwt_bad_alg``);
3. ``typ`` absent, ``JWT`` or ``JOSE``; no ``b64`` extension;
4. ``kid`` present (``jwt_unknown_kid``);
5. ``sub`` a SPIFFE ID naming a workload (``jwt_bad_subject``); the bundle of
   *its* trust domain (``jwt_untrusted_domain``) holds ``kid`` with ``use``
   absent or ``jwt-svid`` (``jwt_unknown_kid``) — a key of another trust
   domain, or a WIT-SVID key, never validates a JWT-SVID;
6. signature (``jwt_bad_signature``), with the key's own algorithm only;
7. ``exp`` required and not passed, ``nbf`` if present reached, both with
   ``leeway`` (``jwt_expired`` / ``jwt_not_yet_valid``);
8. ``aud`` required and containing the expected audience (``jwt_bad_audience``).

The JWS is decoded by the same strict decoder as WITs and WPTs, so a token
one path refuses is refused by all (issue 7, item 13).  Caller mistakes
(a bad audience, leeway, clock or TTL argument) raise
:class:`~custos.jwtsvid.errors.JwtArgumentError`, a ``ValueError``.
"""

from __future__ import annotations

import secrets
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, NoReturn

from joserfc import jwt
from joserfc.errors import JoseError as JoserfcError

from custos._jose import SPIFFE_ALGORITHMS, JoseError, decode_compact, verify_signature
from custos._numbers import InvalidNumberError, finite_number, seconds
from custos.bundle.bundle import USE_JWT_SVID, BundleSet
from custos.identity.errors import InvalidIdentifierError
from custos.identity.ids import SpiffeId, coerce_spiffe_id
from custos.jwtsvid.errors import (
    JwtArgumentError,
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
from custos.keys.base import StoreKey
from custos.keys.jose import JoseKey, signing_key_with_defaults

#: Every algorithm the JWT-SVID spec allows (section 2.1: RFC 7518 sections 3.3-3.5,
#: that is RS*, ES* and PS*; any other ``alg`` MUST be rejected). EdDSA is not
#: among them, so it is refused on both sides even where WITs allow it.
ASYMMETRIC_ALGORITHMS = SPIFFE_ALGORITHMS
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
#: A clock, leeway or TTL: seconds (int / float) or a datetime / timedelta.
Clock = datetime | float | int | None
Duration = timedelta | float | int


@dataclass(frozen=True)
class JwtSvid:
    """A validated JWT-SVID."""

    spiffe_id: SpiffeId
    audience: tuple[str, ...]
    expiry: datetime
    claims: Mapping[str, Any] = field(compare=False)
    token: str = field(repr=False)


# 9999-12-31T23:59:59Z: the last instant a datetime can hold.
_MAX_NUMERIC_DATE = 253402300799


def _argument(error: Exception) -> NoReturn:
    """Re-raise a shared guard's error as this package's argument error."""
    message = (
        error.message
        if isinstance(error, (InvalidNumberError, InvalidIdentifierError))
        else str(error)
    )
    raise JwtArgumentError(message) from error


def _timestamp(now: Clock) -> float:
    """The pinned clock ``now`` (an aware datetime or epoch seconds) as seconds."""
    if now is None:
        return datetime.now(UTC).timestamp()
    if isinstance(now, datetime):
        if now.tzinfo is None:
            raise JwtArgumentError("'now' must be timezone-aware")
        return now.timestamp()
    try:
        # NaN would make every time check false: never expired, never early.
        return finite_number(now, name="now", minimum=0, maximum=_MAX_NUMERIC_DATE)
    except InvalidNumberError as e:
        _argument(e)


def _seconds(value: Duration, name: str, *, minimum: float) -> float:
    try:
        return seconds(value, name=name, minimum=minimum, maximum=_MAX_NUMERIC_DATE)
    except InvalidNumberError as e:
        _argument(e)


def _check_algorithms(algorithms: Collection[str]) -> frozenset[str]:
    allowed = frozenset(algorithms)
    # A caller listing HS256 or none would reopen the attacks this module
    # exists to stop; that is a programming error, not a token failure.
    bad = allowed - ASYMMETRIC_ALGORITHMS
    if bad:
        raise JwtArgumentError(
            f"not allowed for JWT-SVIDs: {sorted(bad)}; choose from {sorted(ASYMMETRIC_ALGORITHMS)}"
        )
    if not allowed:
        raise JwtArgumentError("algorithms must not be empty")
    return allowed


def _check_audience(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise JwtArgumentError(f"audience values must be non-empty strings, got {value!r:.40}")
    try:
        # A lone surrogate (e.g. from a non-UTF-8 command line) is no audience
        # any token can carry: say so instead of failing later.
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise JwtArgumentError("audience is not valid Unicode text") from None
    return value


def _audience_list(audience: Sequence[str] | str) -> list[str]:
    # A bare str is itself a Sequence[str]; never split it into characters.
    values = [audience] if isinstance(audience, str) else list(audience)
    if not values:
        raise JwtArgumentError("a JWT-SVID needs at least one audience")
    return [_check_audience(value) for value in values]


def mint_jwt_svid(
    signing_key: JoseKey | StoreKey,
    alg: str | None = None,
    kid: str | None = None,
    spiffe_id: SpiffeId | str | None = None,
    audience: Sequence[str] | str | None = None,
    ttl: Duration | None = None,
    *,
    now: Clock = None,
    jti: bool = False,
    extra_claims: Mapping[str, Any] | None = None,
) -> str:
    """Sign a JWT-SVID for ``spiffe_id`` (a SpiffeId or ``"spiffe://..."``).

    ``signing_key`` is a :class:`custos.keys.StoreKey` (``store.get(name)``, signs
    in the device) or a joserfc key; ``alg`` and ``kid`` default to the key's own
    JWK members, as for :func:`custos.wimse.wit.mint_wit`.  ``ttl`` is a
    timedelta or seconds; ``now`` an aware datetime or epoch seconds.  A single
    audience is written as a string, several as an array (as go-jose, hence
    SPIRE, does).  The usual call::

        mint_jwt_svid(ca_store.get("jwt-ca"), spiffe_id="spiffe://example.org/svc",
                      audience="spiffe://example.org/api", ttl=timedelta(minutes=5))
    """
    signing_key, alg, kid = signing_key_with_defaults(signing_key, alg, kid, error=JwtArgumentError)
    if spiffe_id is None or audience is None or ttl is None:
        raise JwtArgumentError("mint_jwt_svid needs spiffe_id, audience and ttl")
    if alg not in ASYMMETRIC_ALGORITHMS:
        raise JwtArgumentError(f"alg {alg!r} is not allowed for JWT-SVIDs")
    if not isinstance(kid, str) or not kid:
        raise JwtArgumentError("kid must be a non-empty string")
    try:
        # A JWT-SVID names a workload: the bare trust-domain ID is refused.
        subject = coerce_spiffe_id(spiffe_id)
    except InvalidIdentifierError as e:
        _argument(e)
    aud = _audience_list(audience)
    # Whole seconds: exp is a NumericDate; under one second it would equal iat.
    lifetime = _seconds(ttl, "ttl", minimum=1)
    issued = int(_timestamp(now))
    claims: dict[str, Any] = {}
    if extra_claims:
        clash = RESERVED_CLAIMS & set(extra_claims)
        if clash:
            raise JwtArgumentError(f"extra_claims may not set {sorted(clash)}")
        claims.update(extra_claims)
    claims.update(
        {
            "sub": str(subject),
            "aud": aud[0] if len(aud) == 1 else aud,
            "exp": issued + int(lifetime),
            "iat": issued,
        }
    )
    if jti:
        claims["jti"] = secrets.token_urlsafe(16)
    header = {"typ": "JWT", "alg": alg, "kid": kid}
    try:
        return jwt.encode(header, claims, signing_key, algorithms=[alg])
    except (JoserfcError, ValueError, TypeError) as e:
        raise JwtMintError(f"cannot sign a JWT-SVID with {alg}: {e}") from e


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise JwtMalformedError(f"claim {name!r} must be a number")
    # The strict decoder refused NaN and 1e999; a date past year 9999 (or a
    # huge int) cannot become a datetime: malformed, not valid.
    if not 0 <= value <= _MAX_NUMERIC_DATE:
        raise JwtMalformedError(f"claim {name!r} is not a usable NumericDate")
    return float(value)


#: How each refusal of the JOSE core reads as a JWT-SVID error.
_JOSE_ERRORS: dict[str, type[JwtMalformedError | JwtBadAlgorithmError | JwtBadSignatureError]] = {
    "jose_unsupported_alg": JwtBadAlgorithmError,
    "jose_key_alg_mismatch": JwtBadAlgorithmError,
    "jose_bad_signature": JwtBadSignatureError,
}


def _jose_error(error: JoseError, what: str) -> NoReturn:
    cls = _JOSE_ERRORS.get(error.code, JwtMalformedError)
    raise cls(f"{what}: {error.message}") from error


def validate_jwt_svid(
    token: str,
    audience: str,
    bundles: BundleSet,
    *,
    now: Clock = None,
    leeway: Duration = DEFAULT_LEEWAY,
    algorithms: Collection[str] = DEFAULT_ALGORITHMS,
) -> JwtSvid:
    """Validate a JWT-SVID for ``audience`` against the JWT authorities in ``bundles``.

    ``now`` pins the clock (an aware datetime or epoch seconds); ``leeway`` is
    a timedelta or seconds.  NaN / infinite values are refused, as they would
    turn the time checks off.
    """
    allowed = _check_algorithms(algorithms)
    if not isinstance(audience, str) or not audience:
        raise JwtArgumentError("audience must be a non-empty string")
    _check_audience(audience)
    slack = _seconds(leeway, "leeway", minimum=0)
    now_ts = _timestamp(now)

    # 1. structure (the one strict decoder)
    try:
        jws = decode_compact(token, max_length=MAX_TOKEN_LENGTH)
    except JoseError as e:
        _jose_error(e, "not a strict compact JWS")
    header, claims = jws.header, jws.claims

    # 2. algorithm, before any key is touched
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in allowed:
        raise JwtBadAlgorithmError(f"algorithm {alg!r:.40} is not allowed")

    # 3. header extensions ("crit" was refused by the decoder)
    typ = header.get("typ")
    if typ is not None and typ not in ("JWT", "JOSE"):
        raise JwtMalformedError(f"typ must be JWT or JOSE, not {typ!r:.40}")
    if "b64" in header:
        raise JwtMalformedError("the b64 header extension is not supported")

    # 4. kid
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise JwtUnknownKeyError("token header has no 'kid'")

    # 5. subject -> trust domain -> key
    sub = claims.get("sub")
    if sub is None:
        raise JwtMissingClaimError("token has no 'sub' claim")
    if not isinstance(sub, str):
        raise JwtBadSubjectError("'sub' must be a string")
    try:
        # JWT-SVID 3: sub is the workload's SPIFFE ID, never the trust
        # domain's own (that would pass policies written for its members).
        spiffe_id = coerce_spiffe_id(sub)
    except InvalidIdentifierError as e:
        raise JwtBadSubjectError(f"'sub' is not a workload's SPIFFE ID: {e.message}") from e
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
        verify_signature(authority.public_key, alg, jws.signing_input, jws.signature)
    except JoseError as e:
        _jose_error(e, f"key {kid!r:.80}")

    # 7. time
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
    "MAX_TOKEN_LENGTH",
    "JwtSvid",
    "mint_jwt_svid",
    "validate_jwt_svid",
]
