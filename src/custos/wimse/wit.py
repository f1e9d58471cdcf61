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

Decoding, the algorithm table, the ``cnf`` key import (weak keys refused:
small-order or non-canonical Ed25519 points, EC coordinates or RSA numbers
not in their exact RFC 7518 encodings) and the signature check are
:mod:`custos._jose`'s, shared with WPTs, HTTP signatures and JWT-SVIDs; this
module runs the WIT's checks in a fixed order on the *unverified* header
(``typ``, ``alg``, ``kid`` choose the key) and maps the core's one error to a
WIT code.  joserfc mints tokens and holds the cnf key.
"""

from __future__ import annotations

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
from typing import Any, Literal, NamedTuple

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from joserfc import jws
from joserfc.errors import JoseError as JoserfcError
from joserfc.jwk import ECKey, OKPKey, RSAKey

from custos._jose import (
    ASYMMETRIC_ALGORITHMS,
    PRIVATE_MEMBERS,
    CompactJws,
    JoseError,
    b64url_decode,
    b64url_encode,
    import_public_jwk,
    key_fits_alg,
    loads_strict,
    verify_signature,
)
from custos._jose import SPIFFE_ALGORITHMS as _SPIFFE_ALGORITHMS
from custos._jose import decode_compact as _decode_compact
from custos._numbers import InvalidNumberError, finite_number, seconds
from custos.bundle import USE_WIT_SVID, BundleSet, TrustBundle
from custos.identity import (
    InvalidIdentifierError,
    SpiffeId,
    TrustDomain,
    WimseId,
    coerce_workload_id,
)
from custos.keys.base import StoreKey
from custos.keys.jose import signing_key_with_defaults
from custos.wimse.errors import WimseError, WitError

Profile = Literal["wimse", "spiffe"]
JoseKey = ECKey | OKPKey | RSAKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
Clock = float | int | Callable[[], float] | None

#: Asymmetric JWS algorithms accepted by default (RFC 7518 + RFC 8037). Never
#: ``none``, never ``HS*``: a WIT and a WPT are signatures, not MACs.
DEFAULT_ASYMMETRIC: frozenset[str] = frozenset(ASYMMETRIC_ALGORITHMS)
#: WIT-SVID restricts both the signing ``alg`` and ``cnf.jwk.alg`` to these (no EdDSA).
SPIFFE_ALGORITHMS: frozenset[str] = frozenset(_SPIFFE_ALGORITHMS)

WIT_TYP = "wit+jwt"
#: RFC 7515 section 4.1.9: a ``typ`` without "/" means "application/<typ>", and
#: media types compare case-insensitively, so both spellings are the same type.
_WIT_TYPES = frozenset({"wit+jwt", "application/wit+jwt"})
#: Upper bound on a WIT (and a WPT) in bytes; real ones are well under 2 KiB.
MAX_TOKEN_BYTES = 8 * 1024
DEFAULT_LEEWAY = 60
# Upper bounds on the durations a user sets. A finite but huge value turns a
# time check off as surely as infinity does (leeway=1e15: nothing ever
# expires), so custos._numbers refuses anything above these, each far above
# what a deployment needs (the drafts' proofs and signatures live minutes).
#: clock skew allowance of every verifier (WIT, WPT, HTTP signature): an hour
MAX_LEEWAY = 3600
#: how long a WPT or an HTTP signature may live (max_ttl, max_age, signing ttl): a day
MAX_PROOF_LIFETIME = 86400
#: the longest WIT mint_wit makes: a year (SPIRE's X509-SVIDs live an hour)
MAX_WIT_TTL = 365 * 86400
DEFAULT_CACHE_SIZE = 4096

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
        "wit_weak_cnf",
        "wit_bad_cnf_alg",
        "wit_profile_violation",
    }
)


class BundlesTypeError(WimseError, TypeError):
    """Something other than a BundleSet or a TrustBundle was given as ``bundles``."""

    code = "bundles_invalid"


def as_bundle_set(bundles: object) -> BundleSet:
    """``bundles`` as a :class:`BundleSet`: one :class:`TrustBundle` (every caller
    in one trust domain) is wrapped; anything else is refused now, when the
    verifier is built, rather than as an AttributeError at the first request."""
    if isinstance(bundles, BundleSet):
        return bundles
    if isinstance(bundles, TrustBundle):
        return BundleSet([bundles])
    raise BundlesTypeError(
        f"bundles must be a BundleSet or a TrustBundle, not {type(bundles).__name__}"
    )


class WitMintError(WimseError):
    """A WIT could not be minted with the arguments given (a caller mistake)."""

    code = "wit_mint_invalid"


def _fail(code: str, message: str) -> WitError:
    return WitError(message, code=code)


# -- encoding helpers (shared with custos.wimse.wpt) --------------------------

#: The core's strict decoders under the names this module has always exported.
b64url_decode_strict = b64url_decode
json_object_strict = loads_strict


def token_hash(token: str) -> str:
    """``b64url(SHA-256(ASCII(token)))`` — the ``wth`` / ``tth`` / ``ath`` / ``oth`` value."""
    return b64url_encode(hashlib.sha256(token.encode("ascii")).digest())


def decode_compact(
    token: object, *, max_bytes: int, error: Callable[[str, str], WimseError], prefix: str
) -> CompactJws:
    """:func:`custos._jose.decode_compact` with the core's error mapped to
    ``error(code, message)``: ``<prefix>_too_large`` or ``<prefix>_malformed``."""
    try:
        return _decode_compact(token, max_length=max_bytes)
    except JoseError as e:
        kind = "too_large" if e.code == "jose_too_large" else "malformed"
        raise error(f"{prefix}_{kind}", e.message) from None


def decode_typed(
    token: object,
    *,
    types: Collection[str],
    algorithms: Collection[str],
    error: Callable[[str, str], WimseError],
    prefix: str,
    codes: tuple[str, str],
) -> tuple[CompactJws, str]:
    """:func:`decode_compact`, then the two header checks a WIT and a WPT
    share, in this order: ``typ`` (any case) in ``types`` (``codes[0]``),
    ``alg`` in ``algorithms`` (``codes[1]``).  Returns the decoded JWS and
    its ``alg``.  (The codes are spelled out by the callers, so each code
    is written where it is raised.)"""
    jose = decode_compact(token, max_bytes=MAX_TOKEN_BYTES, error=error, prefix=prefix)
    header = jose.header
    name = prefix.upper()
    typ = header.get("typ")
    if not isinstance(typ, str) or typ.lower() not in types:
        raise error(codes[0], f"{name} typ is not {prefix}+jwt")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in algorithms:
        raise error(codes[1], f"{name} alg is not an accepted asymmetric algorithm")
    return jose, alg


# -- keys ----------------------------------------------------------------------


def signature_valid(key: object, alg: str, signing_input: bytes, signature: bytes) -> bool:
    """Whether :func:`custos._jose.verify_signature` accepts: False for a bad
    signature and for a key that does not fit ``alg`` (the caller raises its
    own code)."""
    try:
        verify_signature(key, alg, signing_input, signature)
    except JoseError:
        return False
    return True


def _joserfc_public(key: PublicKey) -> JoseKey:
    """The joserfc form of a cryptography public key (VerifiedWit.cnf_key).

    Made from the key object itself (joserfc's own ``import_key`` path), so
    joserfc derives its JWK members from the key when asked instead of
    re-validating the members the core has just checked."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return ECKey(key, key)
    if isinstance(key, rsa.RSAPublicKey):
        return RSAKey(key, key)
    return OKPKey(key, key)


#: The members of each key type a cnf.jwk keeps (RFC 7518 6.2.1, 6.3.1, RFC 8037 2).
_KEY_MEMBERS = {"EC": ("crv", "x", "y"), "RSA": ("n", "e"), "OKP": ("crv", "x")}


def _import_cnf_jwk(
    cnf: object, algorithms: Collection[str]
) -> tuple[dict[str, Any], JoseKey, str]:
    """Check ``cnf`` and return (public JWK, joserfc key, alg).

    The key goes through :func:`custos._jose.import_public_jwk`, which refuses
    weak keys: a small-order Ed25519 point verifies a "signature" made with no
    key at all, which would make the WIT a bearer token.
    """
    if not isinstance(cnf, dict) or "jwk" not in cnf:
        raise _fail("wit_bad_cnf", "WIT has no cnf.jwk claim")
    jwk = cnf["jwk"]
    if not isinstance(jwk, dict):
        raise _fail("wit_bad_cnf", "cnf.jwk is not a JSON object")
    if not jwk.keys().isdisjoint(PRIVATE_MEMBERS):
        # Before the alg checks: a symmetric "alg": "HS256" key is first of
        # all key material that must never travel in a token.
        raise _fail("wit_private_cnf", "cnf.jwk holds private or symmetric key material")
    alg = jwk.get("alg")
    if not isinstance(alg, str):
        raise _fail("wit_bad_cnf_alg", "cnf.jwk has no alg")
    if alg not in algorithms:
        raise _fail("wit_bad_cnf_alg", "cnf.jwk alg is not an accepted asymmetric algorithm")
    try:
        key = import_public_jwk(jwk, alg=alg)
    except JoseError as e:
        if e.code == "jose_key_weak":
            raise _fail("wit_weak_cnf", f"cnf.jwk is a weak key: {e.message}") from None
        if e.code in ("jose_key_alg_mismatch", "jose_unsupported_alg"):
            raise _fail(
                "wit_bad_cnf_alg", f"cnf.jwk alg does not fit the key: {e.message}"
            ) from None
        raise _fail("wit_bad_cnf", f"cnf.jwk is not a valid public key: {e.message}") from None
    # Only the key's own members (and alg) are kept: "use"/"key_ops" and the
    # like are not ours to enforce, and joserfc would interpret them.
    kty = jwk["kty"]
    public = {"kty": kty}
    for member in _KEY_MEMBERS[kty]:
        public[member] = jwk[member]
    public["alg"] = alg
    return public, _joserfc_public(key), alg


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
    signing_key, alg, kid = signing_key_with_defaults(signing_key, alg, kid, error=WitMintError)
    if subject is None or workload_public_jwk is None or ttl is None:
        raise WitMintError("mint_wit needs subject, workload_public_jwk and ttl")
    try:
        # A string or an id; the bare trust domain names no workload (as for
        # JWT-SVIDs), so it is refused here too.
        subject = coerce_workload_id(subject)
    except InvalidIdentifierError as e:
        raise WitMintError(f"subject is not a workload identifier: {e.message}") from e
    if isinstance(workload_public_jwk, StoreKey):
        workload_public_jwk = workload_public_jwk.public_jwk()
    try:
        # Whole seconds: exp and iat are NumericDates, and a TTL under one
        # second would truncate to exp == iat, a token dead on arrival.
        ttl_seconds = int(seconds(ttl, name="ttl", minimum=1, maximum=MAX_WIT_TTL))
    except InvalidNumberError as e:
        raise WitMintError(f"ttl must be at least one second and at most a year: {e}") from e
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
    except (JoserfcError, ValueError, TypeError) as e:
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


def numeric_claim(
    claims: Mapping[str, Any], name: str, code: str, error: Callable[[str, str], WimseError]
) -> float | None:
    """The claim ``name`` as a NumericDate, None when absent, else
    ``error(code, ...)`` (the one rule for WIT and WPT times)."""
    value = claims.get(name)
    if value is None:
        return None
    try:
        return numeric_date(value)
    except ValueError:
        raise error(code, f"{name} is not a NumericDate") from None


def _numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    return numeric_claim(claims, name, "wit_malformed", _fail)


class WitShape(NamedTuple):
    """The structure of a WIT, every check done except signature and time.

    An immutable named tuple: one is built for every WIT verified, and a
    tuple costs a fraction of a frozen dataclass's per-field setattr.
    """

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
    #: ``exp``, ``nbf``, ``iat`` as checked NumericDates (None when absent),
    #: so the time checks do not parse them a second time
    exp: float | None = None
    nbf: float | None = None
    iat: float | None = None


@functools.lru_cache(maxsize=1024)
def _workload_id(sub: str) -> SpiffeId | WimseId:
    """:func:`custos.identity.coerce_workload_id` remembered per ``sub``
    string: a relying party sees the same few subjects on every request, and
    the parse was a tenth of a WIT's checks.  Bounded (LRU, and ``sub`` is
    within a token of at most MAX_TOKEN_BYTES), the result is immutable, and
    refusals raise through the cache and are not kept."""
    return coerce_workload_id(sub)


def parse_wit_unverified(
    token: object, *, algorithms: Collection[str] = DEFAULT_ASYMMETRIC, profile: Profile = "wimse"
) -> WitShape:
    """Decode a WIT and check its shape and profile, WITHOUT checking the signature.

    For inspection (CLI, tests, a sender reading its own WIT). Never use the
    result to authenticate anybody.
    """
    if profile not in ("wimse", "spiffe"):
        raise ValueError(f"unknown profile {profile!r}")
    return _parse(token, _allowed(algorithms, profile), profile)


def _allowed(algorithms: Collection[str], profile: Profile) -> frozenset[str]:
    allowed = frozenset(algorithms) & DEFAULT_ASYMMETRIC  # "none"/HS* can never be enabled
    if profile == "spiffe":
        allowed &= SPIFFE_ALGORITHMS
    return allowed


def _parse(token: object, allowed: frozenset[str], profile: Profile) -> WitShape:
    """:func:`parse_wit_unverified` with the algorithm set already worked out
    (a :class:`WitVerifier` does that once, not per token)."""
    jose, alg = decode_typed(
        token,
        types=_WIT_TYPES,
        algorithms=allowed,
        error=_fail,
        prefix="wit",
        codes=("wit_bad_typ", "wit_bad_alg"),
    )
    header, claims = jose.header, jose.claims
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise _fail("wit_missing_kid", "WIT has no kid")
    sub = claims.get("sub")
    if not isinstance(sub, str):
        raise _fail("wit_bad_sub", "WIT has no sub")
    try:
        # spiffe://td is the trust domain itself, not a workload in it: refused.
        subject = _workload_id(sub)
    except InvalidIdentifierError as e:
        raise _fail("wit_bad_sub", f"WIT sub is not a workload identifier: {e.code}") from e
    cnf_jwk, cnf_key, cnf_alg = _import_cnf_jwk(claims.get("cnf"), allowed)
    exp = _numeric_date(claims, "exp")
    iat = _numeric_date(claims, "iat")
    nbf = _numeric_date(claims, "nbf")
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
        exp,
        nbf,
        iat,
    )


def _find_key(bundle: TrustBundle, kid: str, alg: str) -> PublicKey:
    authority = bundle.jwt_authority(kid, use=USE_WIT_SVID)
    if authority is None:
        if bundle.jwt_authority(kid) is not None:
            raise _fail("wit_key_wrong_use", "the kid names a key that is not for WITs")
        raise _fail("wit_unknown_kid", "no WIT key with this kid in the trust domain's bundle")
    # WIT-SVID 6.2: only entries marked wit-svid are WIT-SVID keys. A SPIFFE
    # bundle never yields a key without `use` (the loader skips such entries),
    # so the lookup above (use wit-svid, or none) is that rule for every
    # bundle read from the SPIFFE format. A key without `use` exists only when
    # a user imported a plain JWKS (TrustBundle.from_jwks without use=), which
    # documents it as valid for JWT-SVIDs and WITs alike and saves it under
    # both uses; treating it the same way here keeps a saved and reloaded
    # bundle accepting exactly what the in-memory one did (decision 0015).
    if authority.alg is not None and authority.alg != alg:
        raise _fail("wit_key_alg_mismatch", "the WIT alg differs from its key's alg")
    if not key_fits_alg(authority.public_key, alg):
        raise _fail("wit_key_alg_mismatch", "the WIT alg does not fit its key's type")
    return authority.public_key


def verify_wit(
    token: str,
    bundles: BundleSet | TrustBundle,
    *,
    now: Clock = None,
    leeway: float | timedelta = DEFAULT_LEEWAY,
    algorithms: Collection[str] = DEFAULT_ASYMMETRIC,
    profile: Profile = "wimse",
) -> VerifiedWit:
    """Verify a WIT against the trust bundles; raise :class:`WitError` (with a code) if bad."""
    if profile not in ("wimse", "spiffe"):
        raise ValueError(f"unknown profile {profile!r}")
    return _verify(
        token,
        as_bundle_set(bundles),
        now=resolve_clock(now),
        leeway=seconds(leeway, name="leeway", maximum=MAX_LEEWAY),
        allowed=_allowed(algorithms, profile),
        profile=profile,
    )[0]


def _verify(
    token: str,
    bundles: BundleSet,
    *,
    now: float,
    leeway: float,
    allowed: frozenset[str],
    profile: Profile,
    wth: str | None = None,
) -> tuple[VerifiedWit, TrustBundle]:
    """Verify ``token``; ``wth`` is its :func:`token_hash` if the caller has it already."""
    shape = _parse(token, allowed, profile)
    trust_domain = shape.subject.trust_domain
    bundle = bundles.get(trust_domain)
    if bundle is None:
        raise _fail("wit_unknown_trust_domain", "no trust bundle for the WIT's trust domain")
    public_key = _find_key(bundle, shape.kid, shape.alg)
    assert isinstance(token, str)  # parse_wit_unverified checked it
    # The bundle's cryptography key verifies the parts decoded above directly
    # (no joserfc key import, no second decode).
    if not signature_valid(public_key, shape.alg, shape.signing_input, shape.signature):
        raise _fail("wit_bad_signature", "signature is not valid")

    claims = shape.claims
    exp = shape.exp  # the shape's NumericDates, checked once by _parse
    if exp is None:
        raise _fail("wit_missing_exp", "WIT has no exp")
    if now >= exp + leeway:
        raise _fail("wit_expired", "WIT has expired")
    nbf = shape.nbf
    if nbf is not None and nbf > now + leeway:
        raise _fail("wit_not_yet_valid", "WIT is not valid yet (nbf)")
    iat = shape.iat
    # WIT-SVID 3.6: iat "MUST NOT be used for limiting the earliest validity"
    # (that is nbf's job), so the spiffe profile only checks it is a date.
    if iat is not None and iat > now + leeway and profile != "spiffe":
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
        bundles: BundleSet | TrustBundle,
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
        self.bundles = as_bundle_set(bundles)
        self.leeway = seconds(leeway, name="leeway", maximum=MAX_LEEWAY)
        self.algorithms = frozenset(algorithms)
        self.profile: Profile = profile
        self._allowed = _allowed(self.algorithms, profile)
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
            allowed=self._allowed,
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
    "MAX_LEEWAY",
    "MAX_PROOF_LIFETIME",
    "MAX_TOKEN_BYTES",
    "MAX_WIT_TTL",
    "SPIFFE_ALGORITHMS",
    "WIT_ERROR_CODES",
    "BundlesTypeError",
    "VerifiedWit",
    "WitMintError",
    "WitShape",
    "WitVerifier",
    "as_bundle_set",
    "b64url_decode_strict",
    "b64url_encode",
    "decode_compact",
    "decode_typed",
    "key_fits_alg",
    "mint_wit",
    "new_jti",
    "numeric_claim",
    "parse_wit_unverified",
    "resolve_clock",
    "signature_valid",
    "token_hash",
    "verify_wit",
]
