"""The one error of the JOSE core; callers map its ``code`` to their own."""

from __future__ import annotations

from custos.errors import CustosError

#: Every code a :class:`JoseError` can carry.
JOSE_ERROR_CODES = frozenset(
    {
        # the token or document
        "jose_too_large",  # longer than the caller's max_length
        "jose_malformed",  # not three parts, bad base64url, bad / hostile JSON, crit
        # algorithms
        "jose_unsupported_alg",  # not in ALGORITHMS (none, HS*, unknown)
        # keys
        "jose_key_invalid",  # not a usable public JWK (members missing, not on the curve)
        "jose_key_unsupported",  # kty / crv we do not verify with
        "jose_key_private",  # private or symmetric members present
        "jose_key_weak",  # small-order / non-canonical point, non-minimal encoding, small RSA
        "jose_key_alg_mismatch",  # the key cannot verify this alg
        # signatures
        "jose_bad_signature",
    }
)


class JoseError(CustosError):
    """A JOSE object or key is refused. ``code`` is one of :data:`JOSE_ERROR_CODES`.

    Messages never quote the token, a key or a signature: callers may log them.
    """

    code = "jose_malformed"


__all__ = ["JOSE_ERROR_CODES", "JoseError"]
