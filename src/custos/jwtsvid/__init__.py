"""JWT-SVIDs (SPIFFE JWT-SVID spec): mint and validate."""

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
    JwtSvidError,
    JwtUnknownKeyError,
    JwtUntrustedDomainError,
)
from custos.jwtsvid.jwtsvid import (
    ASYMMETRIC_ALGORITHMS,
    DEFAULT_ALGORITHMS,
    DEFAULT_LEEWAY,
    MAX_TOKEN_LENGTH,
    JwtSvid,
    mint_jwt_svid,
    validate_jwt_svid,
)

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "DEFAULT_ALGORITHMS",
    "DEFAULT_LEEWAY",
    "MAX_TOKEN_LENGTH",
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
    "JwtSvid",
    "JwtSvidError",
    "JwtUnknownKeyError",
    "JwtUntrustedDomainError",
    "mint_jwt_svid",
    "validate_jwt_svid",
]
