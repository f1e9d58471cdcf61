"""custos' one JOSE core: strict compact-JWS decoding, the algorithm table, the
public-JWK import with weak-key refusal, and the signature check.

WIT, WPT, HTTP message signatures, JWT-SVIDs and trust bundles all go through
these functions, so a token or key refused on one path is refused on all.
Private to custos (the leading underscore): other packages call it and map its
one error to their own codes.

API (stable; callers in ``custos.wimse``, ``custos.jwtsvid``, ``custos.bundle``):

``decode_compact(token, *, max_length) -> CompactJws``
    Split and strictly decode a compact JWS, signature not checked.
    ``CompactJws(header: dict, payload: bytes, claims: dict, signing_input: bytes,
    signature: bytes)``.  Refuses non-str / oversized tokens, anything but three
    strict-base64url parts, non-strict JSON (below), ``crit``.  An empty
    signature decodes (so callers can refuse ``alg: none`` by name) and never verifies.
``loads_strict(data: bytes | str) -> dict``
    One JSON object: invalid UTF-8, BOM, duplicate members at any level,
    NaN / Infinity / 1e999, lone surrogates, depth > ``MAX_DEPTH`` (32),
    trailing data -> ValueError.
``b64url_encode(data: bytes) -> str`` / ``b64url_decode(value: str) -> bytes``
    Unpadded base64url; the decoder refuses padding, non-alphabet characters
    and non-canonical trailing bits (ValueError).
``ALGORITHMS: Mapping[str, Algorithm]``
    ``Algorithm(name, kty, crv, hash, signature_length, padding)`` for ES256/384/512,
    RS256/384/512, PS256/384/512, EdDSA (Ed25519).  ``ASYMMETRIC_ALGORITHMS`` is
    every name, ``SPIFFE_ALGORITHMS`` the same without EdDSA (JWT-SVID, WIT-SVID).
``import_public_jwk(jwk, *, alg=None) -> PublicKey``
    The cryptography public key of a public JWK; refuses private members,
    unknown kty/crv, and weak keys: small-order or non-canonical Ed25519
    points, EC coordinates not exactly the curve size or >= p, RSA ``n``/``e``
    with a leading zero octet, modulus < 2048 (or > 16384) bits, exponent even,
    < 3 or >= 2^31.  With ``alg``: the key must fit it (and a JWK ``alg``
    member must equal it).
``check_public_key(key, *, alg=None) -> PublicKey``
    The same rules for a key that is already a cryptography object.
``key_fits_alg(key, alg) -> bool``
    Key type, curve and RSA size fit ``alg``.
``verify_signature(key, alg, signing_input, signature) -> None``
    Raises on a bad signature; keys must have come through one of the two
    checks above.

Every refusal is one :class:`JoseError` (a :class:`~custos.errors.CustosError`)
whose ``code`` is in :data:`JOSE_ERROR_CODES`: ``jose_too_large``,
``jose_malformed``, ``jose_unsupported_alg``, ``jose_key_invalid``,
``jose_key_unsupported``, ``jose_key_private``, ``jose_key_weak``,
``jose_key_alg_mismatch``, ``jose_bad_signature``.  Messages never quote the
token, a key or a signature.

Only public APIs of ``json`` and ``cryptography`` are used.  Minting stays with
joserfc (it holds device keys through ``custos.keys.jose``).
"""

from custos._jose.algorithms import (
    ALGORITHMS,
    ASYMMETRIC_ALGORITHMS,
    MAX_RSA_BITS,
    MIN_RSA_BITS,
    SPIFFE_ALGORITHMS,
    Algorithm,
)
from custos._jose.b64 import b64url_decode, b64url_encode
from custos._jose.compact import CompactJws, decode_compact
from custos._jose.errors import JOSE_ERROR_CODES, JoseError
from custos._jose.jwk import (
    PRIVATE_MEMBERS,
    PublicKey,
    check_public_key,
    import_public_jwk,
    key_fits_alg,
)
from custos._jose.strict_json import MAX_DEPTH, loads_strict
from custos._jose.verify import verify_signature

__all__ = [
    "ALGORITHMS",
    "ASYMMETRIC_ALGORITHMS",
    "JOSE_ERROR_CODES",
    "MAX_DEPTH",
    "MAX_RSA_BITS",
    "MIN_RSA_BITS",
    "PRIVATE_MEMBERS",
    "SPIFFE_ALGORITHMS",
    "Algorithm",
    "CompactJws",
    "JoseError",
    "PublicKey",
    "b64url_decode",
    "b64url_encode",
    "check_public_key",
    "decode_compact",
    "import_public_jwk",
    "key_fits_alg",
    "loads_strict",
    "verify_signature",
]
