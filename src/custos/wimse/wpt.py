"""Workload Proof Tokens (draft-ietf-wimse-wpt-02, and the wpt-01 wire form).

A WPT is a short-lived JWT, ``typ`` ``wpt+jwt``, signed with the workload key
that the caller's WIT binds (``cnf.jwk``); it ties that WIT (``wth``), the
target URI (``aud``) and any context tokens (``tth``, ``oth``) to one request.

Two wire forms:

- **wpt-02** (what we send): ``Workload-Identity-Token: <wit>`` and
  ``Authorization: WPT <wpt>``. No ``ath``: the Authorization field is taken.
- **wpt-01** (accepted unless ``accept_wpt01=False``): ``Workload-Identity-Token``
  and ``Workload-Proof-Token: <wpt>``; a bearer access token in
  ``Authorization: Bearer`` must be bound by ``ath``.

:class:`WptVerifier` implements every receiver check of wpt-02 section 2, each
failure with its own stable ``code`` (:data:`WPT_ERROR_CODES`), in this order:
the WIT (400 on failure), the proof's location, ``typ``, ``alg`` = WIT
``cnf.jwk.alg``, signature, ``aud``, ``exp``, ``nbf``, ``iat``, ``wth``,
``jti``, ``tth``, ``oth``, ``ath``, and last the replay cache, so that only a
proof that passed everything else can use up its ``jti``.

Times: ``exp`` is required; ``nbf`` and ``iat`` are optional, but when present
they are NumericDates and a proof whose ``nbf`` (``wpt_not_yet_valid``) or
``iat`` (``wpt_iat_in_future``) lies more than the leeway ahead of now is
refused, as RFC 7519 asks of ``nbf`` and as a proof "issued" in the future is
no proof of anything yet. All three use the same leeway.

Replay: the ``jti`` is remembered per sender and per variant
(:func:`custos.wimse.replay.replay_namespace`) until ``exp`` + leeway, judged
by the verifier's clock: a pinned ``now`` is passed to the cache.

Audience: the expected value is a *configured* origin plus the request's path
(query and fragment dropped), compared as exact strings; the Host and
X-Forwarded-Host headers are never consulted (wpt-02, "Audience validation").
Origins and paths follow :mod:`custos.wimse.http.origin`, the rules every
sender and verifier share: request targets that different components could
normalise differently (dot segments, encoded dots/slashes/backslashes, double
encoding, backslashes, empty segments) are refused outright.  A verifier may
also accept *exact* audiences, absolute URIs that are not an origin + path
(``spiffe://example.org/custos/server/agent/Attest``), compared byte for byte
with the same binding, time and replay checks.

Raw WIT/WPT values never appear in exception messages; this module logs nothing.
"""

from __future__ import annotations

import functools
import hmac
import json
import re
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from types import MappingProxyType
from typing import Any, ClassVar, Literal

from joserfc import jws
from joserfc.errors import JoseError

from custos._numbers import InvalidNumberError, finite_number, seconds
from custos.bundle import BundleSet, TrustBundle
from custos.errors import CustosError
from custos.identity import SpiffeId, TrustDomain, WimseId
from custos.keys.base import StoreKey
from custos.keys.cryptography_keys import (
    DeviceECPrivateKey,
    DeviceEd25519PrivateKey,
    DeviceRSAPrivateKey,
)
from custos.keys.jose import joserfc_key
from custos.keys.jwk import public_jwk_members
from custos.wimse.errors import (
    WimseError,
    WitError,
    WptError,
    WptReplayError,
)
from custos.wimse.http.message import Endpoint, HttpMessage
from custos.wimse.http.origin import normalize_origin, request_path
from custos.wimse.replay import ReplayCache, replay_namespace
from custos.wimse.wit import (
    DEFAULT_ASYMMETRIC,
    MAX_LEEWAY,
    MAX_PROOF_LIFETIME,
    Clock,
    JoseKey,
    VerifiedWit,
    WitVerifier,
    as_bundle_set,
    b64url_encode,
    check_clock,
    decode_typed,
    new_jti,
    numeric_claim,
    parse_wit_unverified,
    resolve_clock,
    signature_valid,
    token_hash,
)

Wire = Literal["wpt-02", "wpt-01"]

WPT_TYP = "wpt+jwt"
_WPT_TYPES = frozenset({"wpt+jwt", "application/wpt+jwt"})
WIT_HEADER = "Workload-Identity-Token"
WPT01_HEADER = "Workload-Proof-Token"
TXN_TOKEN_HEADER = "Txn-Token"  # noqa: S105 - a header name, not a secret
# The same names folded (HttpMessage.header_values folds only on a miss).
_WIT_FIELD = WIT_HEADER.lower()
_WPT01_FIELD = WPT01_HEADER.lower()
_TXN_TOKEN_FIELD = TXN_TOKEN_HEADER.lower()

DEFAULT_WPT_TTL = 60
#: An exp further ahead than this (plus leeway) is "unreasonably far in the future".
DEFAULT_MAX_TTL = 300
#: Clock skew allowed on the proof's exp; proofs live a minute, so keep it small.
DEFAULT_WPT_LEEWAY = 30
MAX_AUDIENCE_LENGTH = 2048
MAX_JTI_LENGTH = 256

# RFC 9110 token / token68 (section 11.2), the syntax of scheme and credentials.
_AUTH_RE = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+)(?: +(.*))?", re.S)
_TOKEN68_RE = re.compile(r"[A-Za-z0-9._~+/-]+=*")
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")
# Header fields that carry the credentials themselves; never "other tokens".
_RESERVED_FIELDS = frozenset(
    {"authorization", "workload-identity-token", "workload-proof-token", "txn-token"}
)

#: Every code a WPT verification failure can carry (WIT failures keep theirs).
WPT_ERROR_CODES = frozenset(
    {
        "wpt_missing",
        "wpt_both_forms",
        "wpt_multiple_authorization",
        "wpt_multiple_proofs",
        "wpt01_not_accepted",
        "wpt_unexpected_authorization",
        "wpt_malformed",
        "wpt_too_large",
        "wpt_bad_typ",
        "wpt_bad_alg",
        "wpt_alg_mismatch",
        "wpt_bad_signature",
        "wpt_bad_audience",
        "wpt_missing_exp",
        "wpt_expired",
        "wpt_exp_too_far",
        "wpt_not_yet_valid",
        "wpt_iat_in_future",
        "wpt_missing_wth",
        "wpt_wth_mismatch",
        "wpt_missing_jti",
        "wpt_multiple_txn_tokens",
        "wpt_missing_tth",
        "wpt_tth_without_txn_token",
        "wpt_tth_mismatch",
        "wpt_bad_oth",
        "wpt_oth_unknown",
        "wpt_oth_mismatch",
        "wpt_oth_missing",
        "wpt_missing_ath",
        "wpt_ath_mismatch",
        "wpt_ath_without_bearer",
        "wpt_replayed",
    }
)


class WptMintError(WimseError):
    """A WPT could not be made with the arguments given (a caller mistake)."""

    code = "wpt_mint_invalid"


class WptConfigError(WimseError, ValueError):
    """A relying party's WPT configuration is unusable (a deployment mistake)."""

    code = "wpt_config_invalid"


def _fail(code: str, message: str) -> WptError:
    return WptError(message, code=code)


def _wit_fail(code: str, message: str) -> WitError:
    return WitError(message, code=code)


def _hash_equal(claimed: object, expected: str) -> bool:
    """Whether the claimed hash ``claimed`` is ``expected`` (constant time).

    Hashes are base64url, so ASCII: a claim that is not an ASCII string
    cannot match (and compare_digest takes ASCII str without encoding).
    """
    return isinstance(claimed, str) and claimed.isascii() and hmac.compare_digest(claimed, expected)


def _hash_matches(value: str, expected: object) -> bool:
    """Whether ``expected`` is the b64url SHA-256 of ``value`` (constant time)."""
    return value.isascii() and _hash_equal(expected, token_hash(value))


#: RFC 3986 section 3.1: scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
#: Visible ASCII only: a URI (RFC 3986) has no spaces, controls or non-ASCII.
_URI_CHARS_RE = re.compile(r"[!-~]+")


def check_exact_audience(value: object) -> str:
    """``value`` if it can be an exact WPT audience, else :class:`WptConfigError`.

    An absolute URI (RFC 3986: a scheme, then visible ASCII), no fragment,
    at most :data:`MAX_AUDIENCE_LENGTH` characters, compared exactly as
    given (no normalisation), e.g. ``spiffe://example.org/custos/server/agent/Attest``.
    An IRI with non-ASCII characters must be converted to its URI form first:
    the proof's ``aud`` is compared byte for byte.
    """
    if (
        not isinstance(value, str)
        or len(value) > MAX_AUDIENCE_LENGTH
        or not _URI_CHARS_RE.fullmatch(value)
        or not _SCHEME_RE.match(value)
        or "#" in value
    ):
        raise WptConfigError(
            "an exact audience must be an absolute URI of visible ASCII characters "
            f"(scheme:...), without a fragment, at most {MAX_AUDIENCE_LENGTH} characters"
        )
    if is_http_uri(value):
        # A WPT's only binding to the request path is its `aud`; an http(s)
        # exact audience is compared without the path, so one proof would be
        # good on every route. HTTP audiences are configured as origins.
        raise WptConfigError(
            "an http(s) URI cannot be an exact WPT audience (it would accept a proof on "
            "every path); configure its origin in audiences instead"
        )
    return value


def is_http_uri(value: str) -> bool:
    """Whether ``value`` names an http or https URI (any case)."""
    return value[:8].lower().startswith(("http://", "https://"))


def _field_value(value: str) -> str:
    # wpt-02: hash "the header field value with any leading or trailing spaces removed".
    return value.strip(" \t")


def strip_query_and_fragment(uri: str) -> str:
    return uri.split("#", 1)[0].split("?", 1)[0]


# -- sending ---------------------------------------------------------------------


def wpt_ttl(value: object) -> int:
    """A WPT lifetime (whole seconds or a timedelta) as seconds, 1 to
    :data:`DEFAULT_MAX_TTL`; else :class:`WptMintError`.  NaN, infinity and
    bool are refused: a WPT is short-lived by definition."""
    given = value.total_seconds() if isinstance(value, timedelta) else value
    if (
        isinstance(given, bool)
        or not isinstance(given, (int, float))
        or not (1 <= given <= DEFAULT_MAX_TTL)  # NaN fails this too
        or given != int(given)
    ):
        raise WptMintError(
            f"a WPT ttl must be whole seconds, 1..{DEFAULT_MAX_TTL}: a WPT is short-lived"
        )
    return int(given)


def create_wpt(
    signer: JoseKey | StoreKey,
    wit: str,
    audience: str,
    *,
    ttl_seconds: int | timedelta = DEFAULT_WPT_TTL,
    txn_token: str | None = None,
    other_tokens: Mapping[str, str] | None = None,
    wire: Wire = "wpt-02",
    access_token: str | None = None,
    now: float | None = None,
) -> str:
    """Make a WPT for one request to ``audience`` (the target URI; query and
    fragment are stripped here).

    ``signer`` is the workload's key: a :class:`custos.keys.StoreKey` (signs in
    the device) or a joserfc key; it must be the key the WIT binds, and the
    algorithm is the WIT's ``cnf.jwk.alg``.  ``ttl_seconds`` is whole seconds
    or a timedelta, 1 to 300.  ``other_tokens`` maps header field names to
    the values sent in those fields; ``access_token`` (wpt-01 only) adds ``ath``.
    """
    if wire not in ("wpt-02", "wpt-01"):
        raise WptMintError(f"unknown wire form {wire!r}")
    ttl = wpt_ttl(ttl_seconds)
    if now is not None:
        try:
            now = finite_number(now, name="now")
        except InvalidNumberError as e:
            raise WptMintError(e.message) from e
    if isinstance(signer, StoreKey):
        signer = joserfc_key(signer)
    if access_token is not None and wire != "wpt-01":
        raise WptMintError(
            "wpt-02 has no ath: the WPT takes the Authorization field, so no bearer token "
            "can travel with it"
        )
    try:
        binding = _wit_binding(wit) if isinstance(wit, str) else _WitBinding.of(wit)
    except WitError as e:
        raise WptMintError(f"the WIT is unusable: {e.code}", code="wpt_mint_bad_wit") from e
    signer_public = signer.public_key
    # Equal cryptography keys are exactly keys with equal JWK members; the
    # members are computed only on a mismatch, to tell a key custos cannot
    # express from a wrong one.
    if signer_public != binding.cnf_public_key:
        try:
            public_jwk_members(signer_public)
        except CustosError as e:
            raise WptMintError("the signer's public key is unusable") from e
        raise WptMintError(
            "the signer's key is not the key the WIT binds (cnf.jwk)", code="wpt_mint_wrong_key"
        )
    alg = binding.cnf_alg
    aud = strip_query_and_fragment(audience) if isinstance(audience, str) else ""
    if not aud or len(aud) > MAX_AUDIENCE_LENGTH:
        raise WptMintError("audience must be a non-empty target URI")
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "aud": aud,
        "exp": issued + ttl,
        "jti": new_jti(),
        "wth": binding.wth,
    }
    if txn_token is not None:
        claims["tth"] = _hash_for_claim(txn_token, "txn_token")
    if other_tokens:
        oth: dict[str, str] = {}
        for name, value in other_tokens.items():
            lname = name.lower() if isinstance(name, str) else ""
            if not _HEADER_NAME_RE.fullmatch(lname) or lname in _RESERVED_FIELDS:
                raise WptMintError(
                    "other_tokens keys must be header field names (not the credentials' own)"
                )
            oth[lname] = _hash_for_claim(_field_value(value), "other token")
        claims["oth"] = oth
    if access_token is not None:
        claims["ath"] = _hash_for_claim(access_token, "access_token")
    payload = _CLAIMS_JSON.encode(claims).encode()
    try:
        device = _device_signer(signer, alg)
        if device is None:
            return jws.serialize_compact(
                {"alg": alg, "typ": WPT_TYP}, payload, signer, algorithms=[alg]
            )
        # A custos device key (joserfc_key(store_key)) whose own algorithm is
        # alg: the store returns the JOSE-form signature, so the JWS is put
        # together here instead of in joserfc, which would have the device key
        # re-encode r||s as DER for joserfc to decode straight back, and would
        # re-check a header that is a constant.  The key fits alg: it equals
        # the cnf key, which parse_wit_unverified checked against alg.
        signing_input = f"{_wpt_header_b64(alg)}.{b64url_encode(payload)}"
        signature = device.sign(signing_input.encode("ascii"))
        return f"{signing_input}.{b64url_encode(signature)}"
    except (JoseError, ValueError, TypeError) as e:
        raise WptMintError("signing the WPT failed") from e


#: The claims' JSON, compact with sorted members. Built once: ``json.dumps`` with
#: arguments builds an encoder per call (~5 us of a WPT).
_CLAIMS_JSON = json.JSONEncoder(separators=(",", ":"), sort_keys=True)


@dataclass(frozen=True)
class _WitBinding:
    """What a sender needs from its own WIT for each proof."""

    cnf_public_key: object
    cnf_alg: str
    wth: str

    @classmethod
    def of(cls, wit: object) -> _WitBinding:
        shape = parse_wit_unverified(wit)
        assert isinstance(wit, str)  # parse_wit_unverified refuses anything else
        return cls(shape.cnf_key.public_key, shape.cnf_alg, token_hash(wit))


@functools.lru_cache(maxsize=64)
def _wit_binding(wit: str) -> _WitBinding:
    """:meth:`_WitBinding.of`, memoised: a workload sends the same WIT with
    every request until it rotates, and parsing it (strict decode, cnf key
    import, identifier parse) cost more than the rest of ``create_wpt`` minus
    the signature.  Errors are not cached; the result is immutable."""
    return _WitBinding.of(wit)


@functools.lru_cache(maxsize=16)
def _wpt_header_b64(alg: str) -> str:
    header = {"alg": alg, "typ": WPT_TYP}
    return b64url_encode(json.dumps(header, separators=(",", ":")).encode())


def _device_signer(signer: JoseKey, alg: str) -> StoreKey | None:
    """The store key behind ``signer`` if it is a custos device key made for ``alg``."""
    private = signer.private_key
    if isinstance(private, (DeviceECPrivateKey, DeviceEd25519PrivateKey, DeviceRSAPrivateKey)):
        key = private.store_key
        if key.alg.value == alg:
            return key
    return None


def _hash_for_claim(value: object, what: str) -> str:
    if not isinstance(value, str) or not value.isascii() or not value:
        raise WptMintError(f"{what} must be a non-empty ASCII string")
    return token_hash(value)


def wpt_headers(wit: str, wpt: str, wire: Wire = "wpt-02") -> list[tuple[str, str]]:
    """The header fields that carry a WIT and its WPT on the wire."""
    if wire == "wpt-02":
        return [(WIT_HEADER, wit), ("Authorization", f"WPT {wpt}")]
    if wire == "wpt-01":
        return [(WIT_HEADER, wit), (WPT01_HEADER, wpt)]
    raise WptMintError(f"unknown wire form {wire!r}")


# -- receiving -------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class VerifiedCaller:
    """A request whose WIT and WPT both verified."""

    subject: SpiffeId | WimseId
    trust_domain: TrustDomain
    variant: Literal["wpt"]
    wire: Wire
    wit_claims: Mapping[str, Any]
    wpt_claims: Mapping[str, Any]
    wit: VerifiedWit
    #: the WPT variant has no request nonce and cannot ask for a signed
    #: response; the HTTP-signature result carries both, so a relying party
    #: reads either result the same way
    nonce: ClassVar[None] = None
    sign_response: ClassVar[bool] = False


def _parse_authorization(value: str) -> tuple[str | None, str]:
    match = _AUTH_RE.fullmatch(value.strip(" \t"))
    if match is None:
        return None, ""
    return match.group(1).lower(), match.group(2) or ""


class WptVerifier:
    """Verifies requests that carry a WIT and a WPT (either wire form).

    Audiences, from configuration only (never from ``Host``):

    - ``audiences``: origins (``https://api.example.com``); a proof's ``aud``
      must be one of them plus the request's path;
    - ``exact_audiences``: absolute URIs a proof may name as they are, whatever
      the request target, e.g. ``spiffe://example.org/custos/server/agent/Attest``
      for a call that is not an HTTP origin + path;
    - ``verify(request, audience=...)``: the one audience this call accepts,
      exactly (a server that knows which method is being called).

    Replay, binding (``wth``, ``tth``, ``oth``, ``ath``) and time checks are
    the same whichever audience matched.
    """

    def __init__(
        self,
        bundles: BundleSet | TrustBundle | None = None,
        *,
        wit_verifier: WitVerifier | None = None,
        audiences: Iterable[Endpoint | str] = (),
        exact_audiences: Iterable[str] = (),
        replay: ReplayCache,
        accept_wpt01: bool = True,
        max_ttl: float | timedelta = DEFAULT_MAX_TTL,
        leeway: float | timedelta = DEFAULT_WPT_LEEWAY,
        known_other_tokens: Collection[str] = (),
        algorithms: Collection[str] = DEFAULT_ASYMMETRIC,
        now: Clock = None,
    ) -> None:
        now = check_clock(now)
        if wit_verifier is None:
            if bundles is None:
                raise ValueError("give bundles or a wit_verifier")
            wit_verifier = WitVerifier(bundles, now=now)
        elif bundles is not None and as_bundle_set(bundles) is not wit_verifier.bundles:
            raise ValueError("give bundles or a wit_verifier, not two different sources")
        self.wit_verifier = wit_verifier
        self.origins: tuple[str, ...] = tuple(normalize_origin(a) for a in audiences)
        self.exact_audiences: tuple[str, ...] = tuple(
            check_exact_audience(a) for a in exact_audiences
        )
        if not self.origins and not self.exact_audiences:
            raise ValueError("configure at least one audience origin or exact audience")
        if not all(o.isascii() for o in self.origins):  # pragma: no cover - origin.py's A-labels
            raise WptConfigError("configured origins must normalise to ASCII")
        if replay is None or not callable(getattr(replay, "check_and_store", None)):
            raise ValueError("a replay cache is required")
        self.replay = replay
        self.accept_wpt01 = accept_wpt01
        self.max_ttl = seconds(max_ttl, name="max_ttl", minimum=1, maximum=MAX_PROOF_LIFETIME)
        self.leeway = seconds(leeway, name="leeway", maximum=MAX_LEEWAY)
        known = frozenset(n.lower() for n in known_other_tokens)
        bad = [n for n in known if not _HEADER_NAME_RE.fullmatch(n) or n in _RESERVED_FIELDS]
        if bad:
            raise ValueError(
                "known_other_tokens must be header field names other than the credentials'"
            )
        self.known_other_tokens = known
        self.algorithms = frozenset(algorithms) & DEFAULT_ASYMMETRIC
        self._clock = now

    def now(self) -> float:
        return resolve_clock(self._clock)

    # -- the checks ---------------------------------------------------------

    def verify(self, request: HttpMessage, *, audience: str | None = None) -> VerifiedCaller:
        """Every receiver check of wpt-02, in the order of the module docstring.

        ``audience``: when given, the proof must name exactly this audience
        (an absolute URI, see :func:`check_exact_audience`) and the configured
        ones are not consulted; the request may then lack a target (a gRPC call
        whose metadata is the message's headers).
        """
        expected = None if audience is None else check_exact_audience(audience)
        now = self.now()
        wit = self._verify_wit(request)
        token, wire, access_token = self._locate_proof(request)
        jose, alg = decode_typed(
            token,
            types=_WPT_TYPES,
            algorithms=self.algorithms,
            error=_fail,
            prefix="wpt",
            codes=("wpt_bad_typ", "wpt_bad_alg"),
        )
        claims = jose.claims
        if alg != wit.cnf_alg:
            raise _fail("wpt_alg_mismatch", "WPT alg differs from the WIT's cnf.jwk.alg")
        # Checked with the WIT's confirmation key; it refuses a key that does
        # not fit alg.
        if not signature_valid(wit.cnf_key.public_key, alg, jose.signing_input, jose.signature):
            raise _fail("wpt_bad_signature", "signature is not valid")

        aud = claims.get("aud")
        # A list-valued aud is refused: one proof, one target.
        if not isinstance(aud, str) or len(aud) > MAX_AUDIENCE_LENGTH:
            raise _fail("wpt_bad_audience", "WPT aud is not a single target URI")
        if not self._aud_matches(aud, request, expected):
            raise _fail("wpt_bad_audience", "WPT aud does not match this endpoint")

        # exp (required), then nbf and iat (optional).
        exp = numeric_claim(claims, "exp", "wpt_malformed", _fail)
        if exp is None:
            raise _fail("wpt_missing_exp", "WPT has no exp")
        leeway = self.leeway
        if now >= exp + leeway:
            raise _fail("wpt_expired", "WPT has expired")
        if exp > now + self.max_ttl + leeway:
            raise _fail("wpt_exp_too_far", "WPT exp is unreasonably far in the future")
        nbf = numeric_claim(claims, "nbf", "wpt_malformed", _fail)
        if nbf is not None and nbf > now + leeway:
            raise _fail("wpt_not_yet_valid", "WPT is not valid yet (nbf)")
        iat = numeric_claim(claims, "iat", "wpt_malformed", _fail)
        if iat is not None and iat > now + leeway:
            raise _fail("wpt_iat_in_future", "WPT iat is in the future")

        wth = claims.get("wth")
        if wth is None:
            raise _fail("wpt_missing_wth", "WPT has no wth")
        if not _hash_equal(wth, wit.token_hash):
            raise _fail("wpt_wth_mismatch", "WPT wth does not match the WIT")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_LENGTH:
            raise _fail("wpt_missing_jti", "WPT has no usable jti")
        # Each token check has something to check only when the proof or the
        # request carries what it binds; with neither present it would pass
        # without a word, so it is not called.
        if "tth" in claims or request.header_values(_TXN_TOKEN_FIELD):
            self._check_txn_token(claims, request)
        if "oth" in claims or self.known_other_tokens:
            self._check_other_tokens(claims, request)
        if "ath" in claims or access_token is not None:
            self._check_ath(claims, wire, access_token)
        # Last, so only a proof that passed every other check uses up its jti;
        # per sender (wpt-02 "Replay Protection": within the scope of a sender),
        # judged by this verifier's clock when it is pinned.
        namespace = replay_namespace("wpt", str(wit.subject))
        pinned = None if self._clock is None else now
        if not self.replay.check_and_store(namespace, jti, exp + leeway, now=pinned):
            raise WptReplayError("WPT jti was seen before")
        # Positional, in field order (subject, trust_domain, variant, wire,
        # wit_claims, wpt_claims, wit): cheaper than keywords, per request.
        return VerifiedCaller(
            wit.subject,
            wit.trust_domain,
            "wpt",
            wire,
            wit.claims,
            MappingProxyType(claims),
            wit,
        )

    def _aud_matches(self, aud: str, request: HttpMessage, expected: str | None) -> bool:
        """Whether ``aud`` is the audience this request may name (constant time).

        Every configured value is ASCII (origins in their IDNA A-label form,
        exact audiences by :func:`check_exact_audience`), so an ``aud`` with
        anything beyond ASCII — a lone surrogate from a ``\\ud800`` escape
        included — matches none of them and is refused like any other
        mismatch, never encoded.  The request target, when there is one, is
        checked first: an unsafe path is refused whatever the ``aud``.
        """
        path = None if request.target is None else request_path(request.target)
        if not aud.isascii():
            return False
        if expected is not None:
            return hmac.compare_digest(aud, expected)
        matched = False
        for candidate in self.exact_audiences:
            matched |= hmac.compare_digest(aud, candidate)
        if path is not None:
            # A message without a target (a gRPC call's metadata) can be
            # named by exact audiences only.
            for origin in self.origins:
                matched |= hmac.compare_digest(aud, origin + path)
        return matched

    def _verify_wit(self, request: HttpMessage) -> VerifiedWit:
        values = request.header_values(_WIT_FIELD)
        if not values:
            raise _wit_fail("wit_missing", "request has no Workload-Identity-Token")
        if len(values) != 1:
            raise _wit_fail("wit_multiple", "request has more than one Workload-Identity-Token")
        return self.wit_verifier.verify(values[0].strip(" \t"))

    def _locate_proof(self, request: HttpMessage) -> tuple[str, Wire, str | None]:
        """(WPT, wire form, bearer access token of a wpt-01 request)."""
        authorizations = request.header_values("authorization")
        parsed = [_parse_authorization(v) for v in authorizations]
        wpt01 = request.header_values(_WPT01_FIELD)
        # A plain loop: a generator for any() costs more than the one or two
        # fields it looks at.
        has_wpt_scheme = False
        for scheme, _ in parsed:
            if scheme == "wpt":
                has_wpt_scheme = True
                break
        if has_wpt_scheme and wpt01:
            # Accepting either would let an attacker choose which proof is checked.
            raise _fail("wpt_both_forms", "request carries a WPT in both wire forms")
        if has_wpt_scheme:
            if len(authorizations) != 1:
                raise _fail(
                    "wpt_multiple_authorization", "request has more than one Authorization field"
                )
            credentials = parsed[0][1]
            if not _TOKEN68_RE.fullmatch(credentials):
                raise _fail("wpt_malformed", "WPT credentials are not a single token68")
            return credentials, "wpt-02", None
        if not wpt01:
            raise _fail("wpt_missing", "request carries no WPT")
        if not self.accept_wpt01:
            raise _fail("wpt01_not_accepted", "the Workload-Proof-Token form is not accepted here")
        if len(wpt01) != 1:
            raise _fail("wpt_multiple_proofs", "request has more than one Workload-Proof-Token")
        access_token: str | None = None
        if len(authorizations) > 1:
            raise _fail(
                "wpt_multiple_authorization", "request has more than one Authorization field"
            )
        if authorizations:
            scheme, credentials = parsed[0]
            # Only a bearer token can be bound (ath); any other credentials
            # next to the proof would be unbound, so they are refused.
            if scheme != "bearer" or not _TOKEN68_RE.fullmatch(credentials):
                raise _fail(
                    "wpt_unexpected_authorization",
                    "only an ath-bound Bearer token may accompany a Workload-Proof-Token",
                )
            access_token = credentials
        return wpt01[0].strip(" \t"), "wpt-01", access_token

    def _check_txn_token(self, claims: Mapping[str, Any], request: HttpMessage) -> None:
        values = request.header_values(_TXN_TOKEN_FIELD)
        tth = claims.get("tth")
        if len(values) > 1:
            raise _fail("wpt_multiple_txn_tokens", "request has more than one Txn-Token")
        if values and tth is None:
            raise _fail("wpt_missing_tth", "request has a Txn-Token that the WPT does not bind")
        if tth is not None and not values:
            raise _fail("wpt_tth_without_txn_token", "WPT binds a Txn-Token the request lacks")
        if values and not _hash_matches(_field_value(values[0]), tth):
            raise _fail("wpt_tth_mismatch", "WPT tth does not match the Txn-Token")

    def _check_other_tokens(self, claims: Mapping[str, Any], request: HttpMessage) -> None:
        oth = claims.get("oth")
        if oth is not None and not isinstance(oth, dict):
            raise _fail("wpt_bad_oth", "WPT oth is not a JSON object")
        covered = oth or {}
        for name, expected in covered.items():
            # wpt-02: entries not understood MUST reject; names are lowercase.
            if name not in self.known_other_tokens:
                raise _fail("wpt_oth_unknown", "WPT oth names a token this endpoint does not know")
            values = request.header_values(name)
            if len(values) != 1 or not _hash_matches(_field_value(values[0]), expected):
                raise _fail("wpt_oth_mismatch", "WPT oth does not match the request's token")
        for name in self.known_other_tokens:
            # A context token the proof does not cover must not reach authorization.
            if name not in covered and request.header_values(name):
                raise _fail("wpt_oth_missing", "request has a context token the WPT does not bind")

    def _check_ath(self, claims: Mapping[str, Any], wire: Wire, access_token: str | None) -> None:
        ath = claims.get("ath")
        if access_token is None:
            if ath is not None:
                raise _fail("wpt_ath_without_bearer", "WPT binds an access token the request lacks")
            return
        assert wire == "wpt-01"
        if ath is None:
            raise _fail("wpt_missing_ath", "a bearer token next to a wpt-01 proof needs ath")
        if not _hash_matches(access_token, ath):
            raise _fail("wpt_ath_mismatch", "WPT ath does not match the bearer token")


#: The origin module's request-path rule under the name this module exported.
safe_request_path = request_path


def expected_audiences(origins: Sequence[str], target: str) -> list[str]:
    """What aud values a request for ``target`` accepts (for diagnostics and docs)."""
    path = request_path(target)
    return [normalize_origin(o) + path for o in origins]


__all__ = [
    "DEFAULT_MAX_TTL",
    "DEFAULT_WPT_LEEWAY",
    "DEFAULT_WPT_TTL",
    "WPT_ERROR_CODES",
    "VerifiedCaller",
    "WptMintError",
    "WptVerifier",
    "create_wpt",
    "expected_audiences",
    "normalize_origin",
    "safe_request_path",
    "strip_query_and_fragment",
    "wpt_headers",
    "wpt_ttl",
]
