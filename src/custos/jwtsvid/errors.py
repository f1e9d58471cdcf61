"""Errors of JWT-SVID minting and validation. One class per failure a caller
must tell apart, each with a stable ``code``."""

from __future__ import annotations

from custos.errors import CustosError


class JwtSvidError(CustosError):
    code = "jwt_svid_error"


class JwtMalformedError(JwtSvidError):
    """Not a compact JWS, bad base64/JSON, wrong ``typ``, unknown ``crit`` ..."""

    code = "jwt_malformed"


class JwtBadAlgorithmError(JwtSvidError):
    """``alg`` not allowed (``none``, HMAC, unlisted) or not the key's algorithm."""

    code = "jwt_bad_alg"


class JwtUntrustedDomainError(JwtSvidError):
    """No bundle for the trust domain of ``sub``."""

    code = "jwt_untrusted_domain"


class JwtUnknownKeyError(JwtSvidError):
    """``kid`` missing, or not a JWT-SVID authority of the subject's trust domain."""

    code = "jwt_unknown_kid"


class JwtBadSignatureError(JwtSvidError):
    code = "jwt_bad_signature"


class JwtMissingClaimError(JwtSvidError):
    code = "jwt_missing_claim"


class JwtBadSubjectError(JwtSvidError):
    """``sub`` is not a valid SPIFFE ID."""

    code = "jwt_bad_subject"


class JwtAudienceError(JwtSvidError):
    code = "jwt_bad_audience"


class JwtExpiredError(JwtSvidError):
    code = "jwt_expired"


class JwtNotYetValidError(JwtSvidError):
    code = "jwt_not_yet_valid"


class JwtMintError(JwtSvidError):
    """Signing failed (key and ``alg`` do not fit, device error ...)."""

    code = "jwt_mint_error"


class JwtArgumentError(JwtSvidError, ValueError):
    """A caller's argument is unusable: audience, algorithms, leeway, clock, TTL,
    subject.  A ``ValueError`` too, so code written against the old
    ``ValueError`` keeps working."""

    code = "jwt_invalid_argument"


__all__ = [
    "JwtArgumentError",
    "JwtAudienceError",
    "JwtBadAlgorithmError",
    "JwtBadSignatureError",
    "JwtBadSubjectError",
    "JwtExpiredError",
    "JwtMalformedError",
    "JwtMintError",
    "JwtMissingClaimError",
    "JwtNotYetValidError",
    "JwtSvidError",
    "JwtUnknownKeyError",
    "JwtUntrustedDomainError",
]
