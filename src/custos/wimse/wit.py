"""Workload Identity Tokens (draft-ietf-wimse-workload-creds-02) and the SPIFFE
WIT-SVID profile (spiffe/spiffe standards/WIT-SVID.md): minting and strict
verification.

A WIT is a JWS-signed JWT, ``typ`` ``wit+jwt``, signed by the Identity Server
of the subject's trust domain, that binds the workload's public key
(``cnf.jwk``) to its identifier (``sub``).  It is never a bearer token: a
relying party accepts it only together with a proof of possession (a WPT,
:mod:`custos.wimse.wpt`, or an HTTP message signature).

Verification rules worth stating up front:

- keys come only from the trust bundle of ``sub``'s trust domain, looked up by
  ``kid``; ``iss`` is never used to find keys (workload-creds-02 section on
  ``iss``; otherwise one domain could vouch for another's workloads);
- a bundle key whose ``use`` is set must say ``wit-svid`` (a JWT-SVID or X.509
  authority must not be able to mint WITs);
- only asymmetric algorithms, from an allowlist, and the key type must fit the
  algorithm (no ``none``, no HMAC "keyed with the public key");
- every failure has its own stable ``code`` (see :data:`WIT_ERROR_CODES`),
  and no message ever contains the token or parts of it.

The compact-JWS parsing is done here rather than left to joserfc alone because
the checks must run in a fixed order on the *unverified* header (``typ``,
``alg``, ``kid`` choose the key) and must reject things joserfc tolerates:
duplicate JSON members, non-canonical base64url, NaN.  The token is decoded
once, and the signature is checked with ``cryptography`` on the decoded parts
(:func:`signature_ok` says why); joserfc mints tokens and holds the cnf key.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import timedelta
from types import MappingProxyType
from typing import Any, Literal, cast

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, OKPKey, RSAKey

from custos._numbers import InvalidNumberError, finite_number, seconds
from custos.bundle import USE_WIT_SVID, BundleSet, TrustBundle
from custos.identity import (
    InvalidIdentifierError,
    SpiffeId,
    TrustDomain,
    WimseId,
    parse_workload_id,
)
from custos.keys.base import StoreKey
from custos.keys.jose import joserfc_key
from custos.wimse.errors import WimseError, WitError

Profile = Literal["wimse", "spiffe"]
JoseKey = ECKey | OKPKey | RSAKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
Clock = float | int | Callable[[], float] | None

#: Asymmetric JWS algorithms accepted by default (RFC 7518 + RFC 8037). Never
#: ``none``, never ``HS*``: a WIT and a WPT are signatures, not MACs.
DEFAULT_ASYMMETRIC: frozenset[str] = frozenset(
    {"ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA"}
)
#: WIT-SVID restricts both the signing ``alg`` and ``cnf.jwk.alg`` to these (no EdDSA).
SPIFFE_ALGORITHMS: frozenset[str] = DEFAULT_ASYMMETRIC - {"EdDSA"}

WIT_TYP = "wit+jwt"
#: RFC 7515 section 4.1.9: a ``typ`` without "/" means "application/<typ>", and
#: media types compare case-insensitively, so both spellings are the same type.
_WIT_TYPES = frozenset({"wit+jwt", "application/wit+jwt"})
#: Upper bound on a WIT (and a WPT) in bytes; real ones are well under 2 KiB.
MAX_TOKEN_BYTES = 8 * 1024
DEFAULT_LEEWAY = 60
DEFAULT_CACHE_SIZE = 4096

#: RFC 7518 section 6 members that only private or symmetric keys carry.
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k", "r", "t")
#: url-safe -> standard alphabet; "+", "/" and "=" become "!", which strict
#: base64 decoding refuses like any other character outside the alphabet.
_B64URL_TO_STD = bytes.maketrans(b"-_+/=", b"+/!!!")
_B64URL_PAD = (b"", b"", b"==", b"=")
#: The last character of canonical base64url when len % 4 is 2 (4 unused bits)
#: or 3 (2 unused bits): only characters whose unused bits are zero.
_B64URL_CANONICAL_LAST = {2: frozenset("AQgw"), 3: frozenset("AEIMQUYcgkosw048")}
_MIN_RSA_BITS = 2048

#: Every code a WIT verification failure can carry.
WIT_ERROR_CODES = frozenset(
    {
        "wit_missing",
        "wit_multiple",
        "wit_malformed",
        "wit_too_large",
        "wit_bad_typ",
        "wit_bad_alg",
        "wit_missing_kid",
        "wit_bad_sub",
        "wit_unknown_trust_domain",
        "wit_unknown_kid",
        "wit_key_wrong_use",
        "wit_key_alg_mismatch",
        "wit_bad_signature",
        "wit_missing_exp",
        "wit_expired",
        "wit_not_yet_valid",
        "wit_iat_in_future",
        "wit_bad_cnf",
        "wit_private_cnf",
        "wit_bad_cnf_alg",
        "wit_profile_violation",
    }
)


class WitMintError(WimseError):
    """A WIT could not be minted with the arguments given (a caller mistake)."""

    code = "wit_mint_invalid"
    status = 500


def _fail(code: str, message: str) -> WitError:
    return WitError(message, code=code)


# -- encoding helpers (shared with custos.wimse.wpt) --------------------------


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode_strict(value: str) -> bytes:
    """Decode unpadded base64url, refusing anything non-canonical.

    Non-canonical input (stray low bits in the last character) would decode to
    the same bytes as the canonical form, so two different strings would carry
    one signature: refused, so a token has exactly one spelling.

    The canonical check looks at the last character only (its unused low bits
    must be zero) instead of re-encoding the result: same verdict, and this runs
    three times per token on every request.
    """
    rem = len(value) % 4
    if rem == 1:
        raise ValueError("not base64url")
    if rem and value[-1] not in _B64URL_CANONICAL_LAST[rem]:
        raise ValueError("non-canonical base64url")
    # One C pass instead of a regex plus two replaces: the translation turns
    # the url-safe alphabet into the standard one and every character outside
    # it ("+", "/", "=") into one that strict mode refuses, as it refuses
    # whitespace and everything else not in the alphabet; non-ASCII input
    # fails the encode (UnicodeEncodeError is a ValueError).
    return binascii.a2b_base64(
        value.encode("ascii").translate(_B64URL_TO_STD) + _B64URL_PAD[rem], strict_mode=True
    )


def token_hash(token: str) -> str:
    """``b64url(SHA-256(ASCII(token)))`` — the ``wth`` / ``tth`` / ``ath`` / ``oth`` value."""
    return b64url_encode(hashlib.sha256(token.encode("ascii")).digest())


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        # RFC 7515 4: a parser must reject or take the last; two parsers
        # that disagree on which one wins is how token smuggling starts.
        raise ValueError("duplicate member")
    return out


def _reject_constant(_: str) -> Any:
    raise ValueError("NaN/Infinity are not JSON")


#: One decoder for every token: json.loads with hooks would build a new one per call.
_STRICT_JSON = json.JSONDecoder(
    object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant
)


def json_object_strict(raw: bytes) -> dict[str, Any]:
    doc = _STRICT_JSON.decode(raw.decode("utf-8"))
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    return doc


@dataclass(frozen=True)
class CompactJws:
    """A compact JWS split and decoded, signature not yet checked."""

    header: dict[str, Any]
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes


def decode_compact(
    token: object, *, max_bytes: int, error: Callable[[str, str], WimseError], prefix: str
) -> CompactJws:
    """Split a compact JWS into header, claims and signature (no signature check).

    ``error(code, message)`` builds the exception; codes are ``<prefix>_malformed``
    and ``<prefix>_too_large``.
    """
    if not isinstance(token, str):
        raise error(f"{prefix}_malformed", "token is not a string")
    if len(token) > max_bytes:
        raise error(f"{prefix}_too_large", f"token is larger than {max_bytes} bytes")
    parts = token.split(".")
    if len(parts) != 3:
        raise error(f"{prefix}_malformed", "token is not a compact JWS (three parts)")
    head, body, sig = parts
    try:
        header = json_object_strict(b64url_decode_strict(head))
        claims = json_object_strict(b64url_decode_strict(body))
        signature = b64url_decode_strict(sig)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise error(f"{prefix}_malformed", "token is not base64url-encoded JSON") from e
    if "crit" in header:
        # RFC 7515 4.1.11: we understand no extension, so any "crit" is fatal.
        raise error(f"{prefix}_malformed", "token has critical header parameters")
    return CompactJws(header, claims, f"{head}.{body}".encode("ascii"), signature)


# -- keys ----------------------------------------------------------------------

_EC_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}


def key_fits_alg(key: object, alg: str) -> bool:
    """Whether ``key`` (a cryptography public key) can verify ``alg`` signatures."""
    if alg in _EC_CURVES:
        return isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == _EC_CURVES[alg]
    if alg[:2] in ("RS", "PS"):
        return isinstance(key, rsa.RSAPublicKey) and key.key_size >= _MIN_RSA_BITS
    if alg == "EdDSA":
        return isinstance(key, ed25519.Ed25519PublicKey)
    return False


def jose_public_key(key: PublicKey) -> JoseKey:
    """The joserfc form of a cryptography public key."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return ECKey.import_key(key)
    if isinstance(key, rsa.RSAPublicKey):
        return RSAKey.import_key(key)
    return OKPKey.import_key(key)


def check_jws_signature(
    token: str, key: JoseKey, alg: str, error: Callable[[str, str], WimseError], code: str
) -> None:
    """Verify the compact JWS ``token`` with ``key`` under exactly ``alg`` (through joserfc).

    Kept for callers holding a whole token and a joserfc key; the verifiers in
    this package use :func:`signature_ok` on the parts they already decoded.
    """
    try:
        jws.deserialize_compact(token, key, algorithms=[alg])
    except (JoseError, ValueError, TypeError) as e:
        raise error(code, "signature is not valid") from e


_SHA: dict[str, hashes.HashAlgorithm] = {
    "256": hashes.SHA256(),
    "384": hashes.SHA384(),
    "512": hashes.SHA512(),
}
_ECDSA = {alg: ec.ECDSA(_SHA[alg[2:]]) for alg in _EC_CURVES}
#: Bytes per coordinate: r and s each take this many in a JWS ECDSA signature.
_EC_SIG_HALF = {"ES256": 32, "ES384": 48, "ES512": 66}
_PKCS1 = padding.PKCS1v15()
#: RFC 7518 3.5: PSS with MGF1 over the same hash and a salt as long as the
#: hash (what joserfc and other JOSE libraries sign and verify with).
_PSS = {n: padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size) for n, h in _SHA.items()}


def signature_ok(key: object, alg: str, signing_input: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is a valid JWS signature (RFC 7518 encoding) over
    ``signing_input`` under ``alg`` with the cryptography public key ``key``.

    Hand-written instead of ``jws.deserialize_compact`` because it is the
    per-request hot path: the verifiers have already split and strictly decoded
    the token (:func:`decode_compact`) and checked ``alg`` against their
    allowlist, and joserfc would decode the token a second time and rebuild a
    JWK dict from the key on every call (together about twice the cost of the
    signature check itself).  Same algorithms, encodings and paddings as
    joserfc.  ``key_fits_alg`` runs here too, so a key of the wrong type, curve
    or size is refused whatever the caller checked before.
    """
    try:
        half = _EC_SIG_HALF.get(alg)
        if half is not None:
            # key_fits_alg for the ECDSA algorithms, with the signature length.
            if not isinstance(key, ec.EllipticCurvePublicKey):
                return False
            if key.curve.name != _EC_CURVES[alg] or len(signature) != 2 * half:
                return False
            der = encode_dss_signature(
                int.from_bytes(signature[:half], "big"), int.from_bytes(signature[half:], "big")
            )
            key.verify(der, signing_input, _ECDSA[alg])
        elif not key_fits_alg(key, alg):
            return False
        elif isinstance(key, rsa.RSAPublicKey):
            pad = _PKCS1 if alg[0] == "R" else _PSS[alg[2:]]
            key.verify(signature, signing_input, pad, _SHA[alg[2:]])
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, signing_input)
        else:  # pragma: no cover - key_fits_alg admits no other key type
            return False
    except (InvalidSignature, ValueError):
        return False
    return True


_EC_CRV: dict[str, ec.EllipticCurve] = {
    "P-256": ec.SECP256R1(),
    "P-384": ec.SECP384R1(),
    "P-521": ec.SECP521R1(),
}


def _b64_int(value: str) -> int:
    return int.from_bytes(b64url_decode_strict(value), "big")


#: How many distinct workload keys :func:`_public_key_from_members` remembers.
CNF_KEY_CACHE_SIZE = 1024


@functools.lru_cache(maxsize=CNF_KEY_CACHE_SIZE)
def _public_key_from_members(kty: str, crv: str, a: str, b: str) -> PublicKey:
    """The cryptography public key for EC (``crv``, x=a, y=b), RSA (n=a, e=b)
    or Ed25519 (x=a) JWK members; ValueError if they are not a valid key.

    Memoised because building the key validates the point or modulus (about a
    fifth of a full WIT check) and a relying party sees the same few workload
    keys over and over, also when it verifies every WIT.  Safe to share: the
    result is an immutable function of exactly these strings (no canonicalising
    happens before the lookup), and the cache is bounded, so unauthenticated
    input can at worst evict entries.  Errors are not cached.
    """
    if kty == "EC":
        return ec.EllipticCurvePublicNumbers(_b64_int(a), _b64_int(b), _EC_CRV[crv]).public_key()
    if kty == "RSA":
        return rsa.RSAPublicNumbers(_b64_int(b), _b64_int(a)).public_key()
    return ed25519.Ed25519PublicKey.from_public_bytes(b64url_decode_strict(a))


def _import_public_jwk(public: dict[str, Any]) -> JoseKey:
    """A joserfc key for ``public`` (``kty`` and the key's own members).

    Builds the cryptography key directly and wraps it, instead of
    ``ECKey.import_key(dict)``, which costs about twice as much and runs on
    every uncached WIT.  Key types other than EC P-256/384/521, RSA and Ed25519
    go through joserfc unchanged.  Each call returns a new joserfc key object
    (joserfc keys are mutable, e.g. ``ensure_kid``), around a shared immutable
    cryptography key.
    """
    kty = public["kty"]
    if kty == "EC" and public["crv"] in _EC_CRV:
        ec_key = _public_key_from_members("EC", public["crv"], public["x"], public["y"])
        return ECKey(cast(ec.EllipticCurvePublicKey, ec_key), public)
    if kty == "RSA":
        rsa_key = _public_key_from_members("RSA", "", public["n"], public["e"])
        return RSAKey(cast(rsa.RSAPublicKey, rsa_key), public)
    if kty == "OKP" and public["crv"] == "Ed25519":
        ed_key = _public_key_from_members("OKP", "Ed25519", public["x"], "")
        return OKPKey(cast(ed25519.Ed25519PublicKey, ed_key), public)
    if kty == "EC":
        # joserfc's own import raises a bare KeyError for an unknown curve.
        raise ValueError("unsupported EC curve")
    return OKPKey.import_key(public)


def _import_cnf_jwk(
    cnf: object, algorithms: Collection[str]
) -> tuple[dict[str, Any], JoseKey, str]:
    """Check ``cnf`` and return (public JWK, joserfc key, alg)."""
    if not isinstance(cnf, dict) or "jwk" not in cnf:
        raise _fail("wit_bad_cnf", "WIT has no cnf.jwk claim")
    jwk = cnf["jwk"]
    if not isinstance(jwk, dict):
        raise _fail("wit_bad_cnf", "cnf.jwk is not a JSON object")
    if any(m in jwk for m in _PRIVATE_MEMBERS):
        raise _fail("wit_private_cnf", "cnf.jwk holds private or symmetric key material")
    alg = jwk.get("alg")
    if not isinstance(alg, str):
        raise _fail("wit_bad_cnf_alg", "cnf.jwk has no alg")
    if alg not in algorithms:
        raise _fail("wit_bad_cnf_alg", "cnf.jwk alg is not an accepted asymmetric algorithm")
    kty = jwk.get("kty")
    members = {"EC": ("crv", "x", "y"), "RSA": ("n", "e"), "OKP": ("crv", "x")}.get(
        kty if isinstance(kty, str) else ""
    )
    if members is None:
        raise _fail("wit_bad_cnf", "cnf.jwk has an unsupported kty")
    public: dict[str, Any] = {"kty": kty}
    for name in members:
        value = jwk.get(name)
        if not isinstance(value, str) or not value:
            raise _fail("wit_bad_cnf", "cnf.jwk lacks a required key member")
        public[name] = value
    try:
        # Only the key's own members go to joserfc: it would also interpret
        # "use"/"key_ops", which are not ours to enforce here.
        key = _import_public_jwk(public)
    except (JoseError, ValueError, TypeError, KeyError) as e:
        # KeyError: joserfc looks an unknown "crv" up in a dict (e.g. OKP "P-256").
        raise _fail("wit_bad_cnf", "cnf.jwk is not a valid public key") from e
    if not key_fits_alg(key.public_key, alg):
        raise _fail("wit_bad_cnf_alg", "cnf.jwk alg does not fit the key type")
    public["alg"] = alg
    return public, key, alg


def public_cnf_jwk(
    workload_public_jwk: Mapping[str, Any], algorithms: Collection[str]
) -> dict[str, Any]:
    """The ``cnf.jwk`` to put into a WIT: public members and ``alg`` only."""
    try:
        public, _, _ = _import_cnf_jwk({"jwk": dict(workload_public_jwk)}, algorithms)
    except WitError as e:
        raise WitMintError(f"workload key unusable: {e.message}", code="wit_mint_bad_key") from e
    return public


# -- the verified result -----------------------------------------------------------


@dataclass(frozen=True, eq=False)
class VerifiedWit:
    subject: SpiffeId | WimseId
    trust_domain: TrustDomain
    #: all claims, read-only
    claims: Mapping[str, Any]
    #: the confirmation key as a public JWK (key members + ``alg``)
    cnf_jwk: Mapping[str, Any]
    #: the confirmation key as a joserfc key (verifies WPTs)
    cnf_key: JoseKey
    #: ``cnf.jwk.alg``: the only algorithm a proof from this workload may use
    cnf_alg: str
    expires_at: float
    #: ``wth`` of this WIT: b64url(SHA-256(ASCII(token)))
    token_hash: str
    kid: str

    @property
    def cnf_public_key(self) -> PublicKey:
        """The confirmation key as a cryptography public key (for HTTP signatures)."""
        key: PublicKey = self.cnf_key.public_key  # type: ignore[assignment]
        return key


# -- minting -----------------------------------------------------------------------

_RESERVED_CLAIMS = frozenset({"sub", "exp", "iat", "nbf", "jti", "iss", "cnf"})


def new_jti() -> str:
    """128 random bits, base64url: negligible collision probability (RFC 7519 4.1.7)."""
    return b64url_encode(secrets.token_bytes(16))


def mint_wit(
    signing_key: JoseKey | StoreKey,
    alg: str | None = None,
    kid: str | None = None,
    subject: SpiffeId | WimseId | str | None = None,
    workload_public_jwk: Mapping[str, Any] | StoreKey | None = None,
    ttl: timedelta | float | None = None,
    *,
    issuer: str | None = None,
    profile: Profile = "wimse",
    now: float | None = None,
    extra_claims: Mapping[str, Any] | None = None,
) -> str:
    """Mint a WIT for ``subject`` binding ``workload_public_jwk`` (which must carry ``alg``).

    ``signing_key`` is the Identity Server's key: a :class:`custos.keys.StoreKey`
    (``store.get(name)``, signs in the device) or a joserfc key.  ``alg`` and
    ``kid`` default to the key's own JWK members.  ``subject`` may be a string
    (``"spiffe://example.org/svc"``); ``workload_public_jwk`` may be the
    workload's StoreKey; ``ttl`` is a timedelta or seconds (at least one).
    The usual call::

        mint_wit(ca_store.get("wit-ca"), subject="spiffe://example.org/svc",
                 workload_public_jwk=workload_store.get("svc"), ttl=timedelta(hours=1))
    """
    if isinstance(signing_key, StoreKey):
        signing_key = joserfc_key(signing_key)
    if alg is None:
        alg = signing_key.alg
        if not isinstance(alg, str):
            raise WitMintError("give alg=: the signing key's JWK has no alg")
    if kid is None:
        kid = signing_key.kid
        if not isinstance(kid, str):
            raise WitMintError("give kid=: the signing key's JWK has no kid")
    if subject is None or workload_public_jwk is None or ttl is None:
        raise WitMintError("mint_wit needs subject, workload_public_jwk and ttl")
    if isinstance(subject, str):
        try:
            subject = parse_workload_id(subject)
        except InvalidIdentifierError as e:
            raise WitMintError(f"subject is not a workload identifier: {e.message}") from e
    if isinstance(workload_public_jwk, StoreKey):
        workload_public_jwk = workload_public_jwk.public_jwk()
    try:
        # Whole seconds: exp and iat are NumericDates, and a TTL under one
        # second would truncate to exp == iat, a token dead on arrival.
        ttl_seconds = int(seconds(ttl, name="ttl", minimum=1))
    except InvalidNumberError as e:
        raise WitMintError(f"ttl must be a finite duration of at least one second: {e}") from e
    try:
        issued = int(time.time() if now is None else finite_number(now, name="now"))
    except InvalidNumberError as e:
        raise WitMintError(e.message) from e
    if profile not in ("wimse", "spiffe"):
        raise WitMintError(f"unknown profile {profile!r}")
    allowed = SPIFFE_ALGORITHMS if profile == "spiffe" else DEFAULT_ASYMMETRIC
    if alg not in allowed:
        raise WitMintError(f"algorithm {alg!r} is not allowed for the {profile} profile")
    if not isinstance(kid, str) or not kid:
        raise WitMintError("a WIT needs a non-empty kid")
    if not isinstance(subject, (SpiffeId, WimseId)):
        raise WitMintError("subject must be a SpiffeId or WimseId")
    if not subject.path:
        # A trust domain's own ID names no workload (JWT-SVIDs refuse it too).
        raise WitMintError("subject must name a workload, not the bare trust domain")
    if profile == "spiffe" and not isinstance(subject, SpiffeId):
        raise WitMintError("a WIT-SVID's subject must be a spiffe:// ID")
    if not key_fits_alg(signing_key.public_key, alg):
        raise WitMintError(f"the signing key does not fit {alg}")
    cnf_jwk = public_cnf_jwk(workload_public_jwk, allowed)
    extra = dict(extra_claims or {})
    clash = _RESERVED_CLAIMS & extra.keys()
    if clash:
        raise WitMintError(f"extra_claims may not set {', '.join(sorted(clash))}")
    if profile == "spiffe" and "aud" in extra:
        raise WitMintError("a WIT-SVID carries no aud")
    if issuer is not None:
        if not isinstance(issuer, str) or not issuer:
            raise WitMintError("issuer must be a non-empty string")
        if profile == "spiffe" and issuer.lower().startswith("https://"):
            # WIT-SVID 3.7: iss SHOULD NOT be OIDC-discovery compatible, so the
            # token is never taken for an ID token without its proof.
            raise WitMintError("a WIT-SVID issuer should not be an https:// URL")
    claims: dict[str, Any] = {
        **extra,
        "sub": str(subject),
        "iat": issued,
        "exp": issued + ttl_seconds,
        "jti": new_jti(),
        "cnf": {"jwk": cnf_jwk},
    }
    if profile == "spiffe":
        claims["nbf"] = issued  # WIT-SVID 4: the issuer SHOULD set nbf
    if issuer is not None:
        claims["iss"] = issuer
    header = {"alg": alg, "kid": kid, "typ": WIT_TYP}
    payload = json.dumps(claims, separators=(",", ":"), sort_keys=True).encode()
    try:
        return jws.serialize_compact(header, payload, signing_key, algorithms=[alg])
    except (JoseError, ValueError, TypeError) as e:
        raise WitMintError("signing the WIT failed") from e


# -- verification ---------------------------------------------------------------------


def check_clock(clock: Clock) -> Clock:
    """A verifier's ``now`` as given, if usable: None (the real clock), a
    callable, or a finite pinned time (NaN or infinity would turn every
    time check off); else :class:`~custos._numbers.InvalidNumberError`."""
    if clock is None or callable(clock):
        return clock
    return finite_number(clock, name="now")


def resolve_clock(clock: Clock) -> float:
    """The time by ``clock`` (see :func:`check_clock`); a callable clock's
    answer is checked too, each time."""
    if clock is None:
        return time.time()
    return finite_number(clock() if callable(clock) else clock, name="now")


def numeric_date(value: object) -> float:
    """``value`` as a JWT NumericDate, or ValueError (the WIT and WPT rule).

    bool is an int in Python, but JSON true is not a NumericDate; 1e999 parses
    as an infinite float (a token that never expires); an int beyond 64 bits
    cannot become a float (OverflowError, a 500) and is no date anyone issues.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, int) and not -(2**63) <= value < 2**63)
        or not math.isfinite(value)
    ):
        raise ValueError("not a NumericDate")
    return float(value)


def _numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    try:
        return numeric_date(value)
    except ValueError:
        raise _fail("wit_malformed", f"{name} is not a NumericDate") from None


@dataclass(frozen=True)
class WitShape:
    """The structure of a WIT, every check done except signature and time."""

    header: dict[str, Any]
    claims: dict[str, Any]
    subject: SpiffeId | WimseId
    kid: str
    alg: str
    cnf_jwk: dict[str, Any]
    cnf_key: JoseKey
    cnf_alg: str
    signing_input: bytes
    #: the decoded JWS signature (``b""`` when a caller builds a shape by hand)
    signature: bytes = b""


def parse_wit_unverified(
    token: object, *, algorithms: Collection[str] = DEFAULT_ASYMMETRIC, profile: Profile = "wimse"
) -> WitShape:
    """Decode a WIT and check its shape and profile, WITHOUT checking the signature.

    For inspection (CLI, tests, a sender reading its own WIT). Never use the
    result to authenticate anybody.
    """
    if profile not in ("wimse", "spiffe"):
        raise ValueError(f"unknown profile {profile!r}")
    allowed = frozenset(algorithms) & DEFAULT_ASYMMETRIC  # "none"/HS* can never be enabled
    if profile == "spiffe":
        allowed &= SPIFFE_ALGORITHMS
    jose = decode_compact(token, max_bytes=MAX_TOKEN_BYTES, error=_fail, prefix="wit")
    header, claims = jose.header, jose.claims
    typ = header.get("typ")
    if not isinstance(typ, str) or typ.lower() not in _WIT_TYPES:
        raise _fail("wit_bad_typ", "WIT typ is not wit+jwt")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in allowed:
        raise _fail("wit_bad_alg", "WIT alg is not an accepted asymmetric algorithm")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise _fail("wit_missing_kid", "WIT has no kid")
    sub = claims.get("sub")
    if not isinstance(sub, str):
        raise _fail("wit_bad_sub", "WIT has no sub")
    try:
        subject = parse_workload_id(sub)
    except InvalidIdentifierError as e:
        raise _fail("wit_bad_sub", f"WIT sub is not a workload identifier: {e.code}") from e
    if not subject.path:
        # spiffe://td is the trust domain itself, not a workload in it.
        raise _fail("wit_bad_sub", "WIT sub is a bare trust domain, not a workload")
    cnf_jwk, cnf_key, cnf_alg = _import_cnf_jwk(claims.get("cnf"), allowed)
    for name in ("exp", "iat", "nbf"):
        _numeric_date(claims, name)
    if profile == "spiffe":
        if not isinstance(subject, SpiffeId):
            raise _fail("wit_profile_violation", "a WIT-SVID's sub must be a spiffe:// ID")
        if "aud" in claims:
            raise _fail("wit_profile_violation", "a WIT-SVID must not carry aud")
    return WitShape(
        header,
        claims,
        subject,
        kid,
        alg,
        cnf_jwk,
        cnf_key,
        cnf_alg,
        jose.signing_input,
        jose.signature,
    )


def _find_key(bundle: TrustBundle, kid: str, alg: str, profile: Profile) -> PublicKey:
    authority = bundle.jwt_authority(kid, use=USE_WIT_SVID)
    if authority is None:
        if bundle.jwt_authority(kid) is not None:
            raise _fail("wit_key_wrong_use", "the kid names a key that is not for WITs")
        raise _fail("wit_unknown_kid", "no WIT key with this kid in the trust domain's bundle")
    if profile == "spiffe" and authority.use != USE_WIT_SVID:
        # WIT-SVID 6.2: only entries marked wit-svid are WIT-SVID keys.
        raise _fail("wit_key_wrong_use", "a WIT-SVID key must be marked use=wit-svid")
    if authority.alg is not None and authority.alg != alg:
        raise _fail("wit_key_alg_mismatch", "the WIT alg differs from its key's alg")
    if not key_fits_alg(authority.public_key, alg):
        raise _fail("wit_key_alg_mismatch", "the WIT alg does not fit its key's type")
    return authority.public_key


def verify_wit(
    token: str,
    bundles: BundleSet,
    *,
    now: Clock = None,
    leeway: float | timedelta = DEFAULT_LEEWAY,
    algorithms: Collection[str] = DEFAULT_ASYMMETRIC,
    profile: Profile = "wimse",
) -> VerifiedWit:
    """Verify a WIT against the trust bundles; raise :class:`WitError` (with a code) if bad."""
    return _verify(
        token,
        bundles,
        now=resolve_clock(now),
        leeway=seconds(leeway, name="leeway"),
        algorithms=algorithms,
        profile=profile,
    )[0]


def _verify(
    token: str,
    bundles: BundleSet,
    *,
    now: float,
    leeway: float,
    algorithms: Collection[str],
    profile: Profile,
    wth: str | None = None,
) -> tuple[VerifiedWit, TrustBundle]:
    """Verify ``token``; ``wth`` is its :func:`token_hash` if the caller has it already."""
    shape = parse_wit_unverified(token, algorithms=algorithms, profile=profile)
    trust_domain = shape.subject.trust_domain
    bundle = bundles.get(trust_domain)
    if bundle is None:
        raise _fail("wit_unknown_trust_domain", "no trust bundle for the WIT's trust domain")
    public_key = _find_key(bundle, shape.kid, shape.alg, profile)
    assert isinstance(token, str)  # parse_wit_unverified checked it
    # The bundle's cryptography key verifies the parts decoded above directly
    # (see signature_ok): no joserfc key import, no second decode.
    if not signature_ok(public_key, shape.alg, shape.signing_input, shape.signature):
        raise _fail("wit_bad_signature", "signature is not valid")

    claims = shape.claims
    exp = _numeric_date(claims, "exp")
    if exp is None:
        raise _fail("wit_missing_exp", "WIT has no exp")
    if now >= exp + leeway:
        raise _fail("wit_expired", "WIT has expired")
    nbf = _numeric_date(claims, "nbf")
    if nbf is not None and nbf > now + leeway:
        raise _fail("wit_not_yet_valid", "WIT is not valid yet (nbf)")
    iat = _numeric_date(claims, "iat")
    if iat is not None and iat > now + leeway:
        raise _fail("wit_iat_in_future", "WIT was issued in the future (iat)")
    verified = VerifiedWit(
        subject=shape.subject,
        trust_domain=trust_domain,
        claims=MappingProxyType(claims),
        cnf_jwk=MappingProxyType(shape.cnf_jwk),
        cnf_key=shape.cnf_key,
        cnf_alg=shape.cnf_alg,
        expires_at=exp,
        token_hash=wth if wth is not None else token_hash(token),
        kid=shape.kid,
    )
    return verified, bundle


class WitVerifier:
    """Verifies WITs and remembers the good ones until they expire.

    A caller sends the same WIT with every request for hours, so a relying
    party that caches it pays for one signature check per request (the proof's)
    instead of two.  The cache is keyed by the token itself (a dict lookup
    compares the whole string: no SHA-256 per request, and no two tokens can
    share an entry), bounded (LRU; an entry holds at most one token's bytes
    next to its decoded claims, which are as large),
    and an entry is used only while its WIT is unexpired and the trust bundle
    it was checked against is still the one in force (bundles are immutable and
    a :class:`BundleSet` swaps in new objects, so an identity check sees any
    rotation or key removal).
    """

    def __init__(
        self,
        bundles: BundleSet,
        *,
        now: Clock = None,
        leeway: float | timedelta = DEFAULT_LEEWAY,
        algorithms: Collection[str] = DEFAULT_ASYMMETRIC,
        profile: Profile = "wimse",
        max_entries: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 0:
            raise ValueError("max_entries must be an int >= 0")
        if profile not in ("wimse", "spiffe"):
            raise ValueError(f"unknown profile {profile!r}")
        self.bundles = bundles
        self.leeway = seconds(leeway, name="leeway")
        self.algorithms = frozenset(algorithms)
        self.profile: Profile = profile
        self._clock = check_clock(now)
        self._max = max_entries
        self._cache: OrderedDict[str, tuple[VerifiedWit, TrustBundle]] = OrderedDict()
        self._lock = threading.Lock()

    def now(self) -> float:
        return resolve_clock(self._clock)

    def verify(self, token: str) -> VerifiedWit:
        now = self.now()
        if self._max > 0 and type(token) is str:
            # Looked up before the isascii/length test that decides storing:
            # only tokens that passed it are ever stored, so for any other
            # the lookup misses, as the test would have skipped it.
            with self._lock:
                hit = self._cache.get(token)
                if hit is not None:
                    wit, bundle = hit
                    # bundle.trust_domain equals wit.trust_domain (the bundle
                    # was looked up by it) and is the object the BundleSet
                    # keys it under, so the lookup needs no __eq__ call.
                    if (
                        now < wit.expires_at + self.leeway
                        and self.bundles.get(bundle.trust_domain) is bundle
                    ):
                        self._cache.move_to_end(token)
                        return wit
                    del self._cache[token]
        cacheable = (
            self._max > 0
            and isinstance(token, str)
            and token.isascii()
            and len(token) <= MAX_TOKEN_BYTES
        )
        wit, bundle = _verify(
            token,
            self.bundles,
            now=now,
            leeway=self.leeway,
            algorithms=self.algorithms,
            profile=self.profile,
        )
        if cacheable:
            with self._lock:
                self._cache[token] = (wit, bundle)
                self._cache.move_to_end(token)
                while len(self._cache) > self._max:
                    self._cache.popitem(last=False)
        return wit

    def __len__(self) -> int:
        return len(self._cache)

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()


__all__ = [
    "DEFAULT_ASYMMETRIC",
    "MAX_TOKEN_BYTES",
    "SPIFFE_ALGORITHMS",
    "WIT_ERROR_CODES",
    "VerifiedWit",
    "WitMintError",
    "WitShape",
    "WitVerifier",
    "b64url_decode_strict",
    "b64url_encode",
    "check_jws_signature",
    "decode_compact",
    "jose_public_key",
    "key_fits_alg",
    "mint_wit",
    "new_jti",
    "parse_wit_unverified",
    "resolve_clock",
    "signature_ok",
    "token_hash",
    "verify_wit",
]
