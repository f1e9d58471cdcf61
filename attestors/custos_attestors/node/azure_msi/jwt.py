"""RS256 verification of an Azure AD access token, on custos' JOSE core (``custos._jose``,
decision 0016) and the shared JWKS rules (:mod:`custos_attestors.node._jwks`).

Only what Azure AD access tokens use: a compact JWS (strictly decoded by
:func:`custos._jose.decode_compact`: canonical base64url, one JSON object each, no
duplicate members), header ``alg`` = ``RS256`` with a ``kid``, an RSA key of 2048 to
8192 bits of that ``kid`` in the trusted key set. Anything else (``none``, HS256,
RS512, an embedded ``jwk``, a ``jku``/``x5u``/``x5c``, ``crit``) is refused by
:func:`header_kid` before a key is looked up or fetched, so no header can choose the key
or the algorithm. The signature is checked by :func:`custos._jose.verify_signature`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from custos._jose import (
    CompactJws,
    JoseError,
    b64url_decode,
    decode_compact,
    loads_strict,
    verify_signature,
)
from custos.errors import CustosError
from custos_attestors.node._jwks import parse_rsa_jwks
from custos_attestors.node.azure_msi.wire import MAX_TOKEN_CHARS

MAX_JWKS_BYTES = 256 * 1024
MAX_KEYS = 64
#: A token naming an unknown kid makes the URL source fetch again at most this often.
MIN_REFETCH = 30.0

Keys = Mapping[str, rsa.RSAPublicKey]


class AzureTokenError(CustosError):
    """The token is malformed or its signature does not verify; ``code`` says which."""

    code = "azure_msi_token_invalid"


def b64url(data: str, what: str) -> bytes:
    """Strict unpadded base64url (:func:`custos._jose.b64url_decode`)."""
    try:
        return b64url_decode(data)
    except ValueError:
        raise AzureTokenError(f"{what} is not unpadded base64url") from None


def parse_jwks(data: bytes) -> Keys:
    """The RS256 signing keys of a JWKS document, by ``kid`` (at most 256 KiB and 64
    keys; other keys are skipped; :class:`.._jwks.JwksError` if none)."""
    return parse_rsa_jwks(data, max_bytes=MAX_JWKS_BYTES, max_keys=MAX_KEYS).keys


_FORBIDDEN_HEADERS = frozenset({"crit", "jwk", "jku", "x5u", "x5c"})


def _bad_algorithm(message: str) -> AzureTokenError:
    return AzureTokenError(message, code="azure_msi_bad_algorithm")


def split(token: str) -> CompactJws:
    """The strictly decoded compact JWS (signature not checked)."""
    try:
        return decode_compact(token, max_length=MAX_TOKEN_CHARS)
    except JoseError:
        pass
    # The core refuses a crit header as malformed; say which, as the other forbidden
    # headers are said (decoding the header again only on this error path).
    try:
        header = loads_strict(b64url_decode(token.split(".", 1)[0]))
    except ValueError:
        header = {}
    if "crit" in header:
        raise _bad_algorithm("the token header carries crit/jwk/jku/x5u/x5c")
    raise AzureTokenError("the token is not a strictly encoded compact JWS of JSON objects")


def header_kid(jws: CompactJws) -> str:
    """The header's ``kid``, once ``alg`` is ``RS256`` and no header names a key, a key
    URL or a critical extension."""
    header: Mapping[str, Any] = jws.header
    if header.get("alg") != "RS256":
        raise _bad_algorithm("the token is not signed with RS256")
    if not _FORBIDDEN_HEADERS.isdisjoint(header):
        raise _bad_algorithm("the token header carries crit/jwk/jku/x5u/x5c")
    kid = header.get("kid")
    if not isinstance(kid, str):
        raise AzureTokenError("the token header has no kid")
    return kid


def verify_rs256(jws: CompactJws, kid: str, keys: Keys) -> dict[str, Any]:
    """The token's claims if its RS256 signature verifies with ``keys[kid]``
    (``kid`` from :func:`header_kid`)."""
    key = keys.get(kid)
    if key is None:
        raise AzureTokenError(
            f"the token's key {kid[:80]!r} is not in the trusted JWKS",
            code="azure_msi_unknown_key",
        )
    try:
        verify_signature(key, "RS256", jws.signing_input, jws.signature)
    except JoseError:
        raise AzureTokenError(
            "the token's signature does not verify", code="azure_msi_bad_signature"
        ) from None
    return jws.claims


__all__ = [
    "MAX_JWKS_BYTES",
    "MAX_KEYS",
    "MIN_REFETCH",
    "AzureTokenError",
    "Keys",
    "b64url",
    "header_kid",
    "parse_jwks",
    "split",
    "verify_rs256",
]
