"""RS256 verification of an Azure AD access token, on custos' JOSE core (``custos._jose``,
decision 0016) and the shared JWKS rules (:mod:`custos_attestors.node._jwks`).

Only what Azure AD access tokens use: a compact JWS (strictly decoded by
:func:`custos._jose.decode_compact`: canonical base64url, one JSON object each, no
duplicate members), header ``alg`` = ``RS256`` with a ``kid``, an RSA key of 2048 to
8192 bits of that ``kid`` in the trusted key set. Anything else (``none``, HS256,
RS512, an embedded ``jwk``, a ``jku``/``x5u``/``x5c``, ``crit``) is refused by
:func:`decode` before a key is looked up or fetched, so no header can choose the key
or the algorithm. The signature is checked by :func:`custos._jose.verify_signature`.
Both steps are the shared ones of :mod:`custos_attestors.node._jwks` (``gcp_iit`` uses
them too); this module maps their refusals to ``azure_msi`` codes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from custos._jose import CompactJws, b64url_decode
from custos.errors import CustosError
from custos_attestors.node._jwks import (
    TokenRefusal,
    TokenRefusedError,
    decode_rs256,
    parse_rsa_jwks,
)
from custos_attestors.node._jwks import verify_rs256 as shared_verify_rs256
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


#: The shared refusal reasons (:mod:`.._jwks`) as this attestor's codes.
_CODES: Mapping[TokenRefusal, str] = {
    "malformed": "azure_msi_token_invalid",
    "bad_algorithm": "azure_msi_bad_algorithm",
    "no_kid": "azure_msi_token_invalid",
    "unknown_key": "azure_msi_unknown_key",
    "bad_signature": "azure_msi_bad_signature",
}


def _refused(e: TokenRefusedError) -> AzureTokenError:
    return AzureTokenError(e.message, code=_CODES[e.reason])


def decode(token: str) -> tuple[CompactJws, str]:
    """The strictly decoded compact JWS (signature not checked) and its header's ``kid``,
    once ``alg`` is ``RS256`` and no header names a key, a key URL or a critical
    extension (:func:`.._jwks.decode_rs256`)."""
    try:
        return decode_rs256(token, max_length=MAX_TOKEN_CHARS)
    except TokenRefusedError as e:
        raise _refused(e) from None


def verify_rs256(jws: CompactJws, kid: str, keys: Keys) -> dict[str, Any]:
    """The token's claims if its RS256 signature verifies with ``keys[kid]``
    (``kid`` from :func:`decode`; :func:`.._jwks.verify_rs256`)."""
    try:
        return shared_verify_rs256(jws, kid, keys)
    except TokenRefusedError as e:
        raise _refused(e) from None


__all__ = [
    "MAX_JWKS_BYTES",
    "MAX_KEYS",
    "MIN_REFETCH",
    "AzureTokenError",
    "Keys",
    "b64url",
    "decode",
    "parse_jwks",
    "verify_rs256",
]
