"""Trust bundles: the X.509 and JWT authorities of one trust domain, and sets of
them for federation.

Format: SPIFFE Trust Domain and Bundle spec, section 4 — a JWK Set whose
entries carry ``use``: ``x509-svid`` (one CA certificate in ``x5c``, no
``kid``) or ``jwt-svid`` (a public key with a ``kid``), plus the top-level
``spiffe_sequence`` and ``spiffe_refresh_hint``.  ``wit-svid`` entries (WIMSE
Workload Identity Token authorities) are read like ``jwt-svid`` ones and keep
their ``use``, so a verifier can tell the two apart.

JWK -> key conversion goes through joserfc (it checks EC points are on the
curve, RSA parameters are sane ...); only the key's own members are handed to
it, because joserfc refuses SPIFFE's ``use`` values.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from joserfc.errors import JoseError
from joserfc.jwk import JWKRegistry

from custos.bundle.errors import BundleError
from custos.identity.ids import TrustDomain
from custos.keys.errors import UnsupportedAlgorithmError
from custos.keys.jwk import public_jwk_members, thumbprint

USE_X509_SVID = "x509-svid"
USE_JWT_SVID = "jwt-svid"
USE_WIT_SVID = "wit-svid"

#: Public keys a JWT authority may hold.
JwtPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey

#: JWK members that only a private (or symmetric) key has (RFC 7518 section 6).
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
#: The members that define each key type's public key.
_KEY_MEMBERS = {"EC": ("crv", "x", "y"), "RSA": ("n", "e"), "OKP": ("crv", "x")}
_JWT_KEY_TYPES = (ec.EllipticCurvePublicKey, rsa.RSAPublicKey, ed25519.Ed25519PublicKey)
MIN_RSA_BITS = 2048
#: Bundles are small (a few keys); this bounds what a hostile endpoint can make us parse.
MAX_BUNDLE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, eq=False)
class JwtAuthority:
    """A key that signs JWT-SVIDs (or, with ``use="wit-svid"``, WITs) in a trust domain."""

    kid: str
    public_key: JwtPublicKey
    use: str | None = None
    alg: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.kid, str) or not self.kid:
            raise BundleError("a JWT authority needs a non-empty 'kid'")
        if not isinstance(self.public_key, _JWT_KEY_TYPES):
            raise BundleError(
                f"unsupported JWT authority key type {type(self.public_key).__name__} "
                "(EC, RSA or Ed25519 public keys only)"
            )
        key = self.public_key
        if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
            raise BundleError(
                f"RSA key {self.kid!r} has {key.key_size} bits; at least {MIN_RSA_BITS} needed"
            )

    def jwk(self) -> dict[str, Any]:
        """The public JWK of this authority (with ``kid``, and ``use`` / ``alg`` when set)."""
        members: dict[str, Any] = dict(public_jwk_members(self.public_key))
        members["kid"] = self.kid
        if self.use is not None:
            members["use"] = self.use
        if self.alg is not None:
            members["alg"] = self.alg
        return members

    def _identity(self) -> tuple[str, str | None, str | None, str]:
        # cryptography's public keys are not hashable; the RFC 7638 thumbprint
        # identifies the key itself.
        return (self.kid, self.use, self.alg, thumbprint(self.public_key))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, JwtAuthority):
            return NotImplemented
        return self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash(self._identity())


def _same_key(a: JwtAuthority, b: JwtAuthority) -> bool:
    return thumbprint(a.public_key) == thumbprint(b.public_key)


def _dedupe_certs(certs: Iterable[x509.Certificate]) -> tuple[x509.Certificate, ...]:
    seen: set[bytes] = set()
    out: list[x509.Certificate] = []
    for cert in certs:
        if not isinstance(cert, x509.Certificate):
            raise BundleError(f"x509 authorities must be certificates, not {type(cert).__name__}")
        der = cert.public_bytes(Encoding.DER)
        if der not in seen:
            seen.add(der)
            out.append(cert)
    return tuple(out)


def _dedupe_jwt(authorities: Iterable[JwtAuthority]) -> tuple[JwtAuthority, ...]:
    out: list[JwtAuthority] = []
    for auth in authorities:
        if not isinstance(auth, JwtAuthority):
            raise BundleError(f"JWT authorities must be JwtAuthority, not {type(auth).__name__}")
        if auth in out:
            continue
        for other in out:
            # Two different keys that a lookup by kid (and use) could both
            # return would make signature checks depend on list order.
            if (
                other.kid == auth.kid
                and (other.use == auth.use or other.use is None or auth.use is None)
                and not _same_key(other, auth)
            ):
                raise BundleError(f"two different keys share kid {auth.kid!r} in one bundle")
        out.append(auth)
    return tuple(out)


def _check_uint(value: object, what: str) -> int | None:
    if value is None:
        return None
    # bool is an int in Python; JSON true is not a number.
    # Upper bound: SPIRE and go-spiffe hold both fields in 64 bits; a larger
    # value would be read differently (or refused) by every other consumer.
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
        raise BundleError(f"{what} must be an integer in 0..2^64-1, got {value!r:.40}")
    return value


@dataclass(frozen=True)
class TrustBundle:
    """The authorities of one trust domain. Immutable: ``with_*`` return new bundles."""

    trust_domain: TrustDomain
    x509_authorities: tuple[x509.Certificate, ...] = ()
    jwt_authorities: tuple[JwtAuthority, ...] = ()
    sequence: int | None = None
    refresh_hint: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.trust_domain, TrustDomain):
            raise BundleError(
                f"trust_domain must be a TrustDomain, not {type(self.trust_domain).__name__}"
            )
        # frozen: normalise through object.__setattr__ (accept any iterable, store tuples)
        object.__setattr__(self, "x509_authorities", _dedupe_certs(self.x509_authorities))
        object.__setattr__(self, "jwt_authorities", _dedupe_jwt(self.jwt_authorities))
        _check_uint(self.sequence, "sequence")
        _check_uint(self.refresh_hint, "refresh_hint")

    # -- queries ---------------------------------------------------------

    def jwt_authority(self, kid: str, *, use: str | None = None) -> JwtAuthority | None:
        """The authority with ``kid``; with ``use``, only one whose ``use`` is that or absent."""
        for auth in self.jwt_authorities:
            if auth.kid == kid and (use is None or auth.use is None or auth.use == use):
                return auth
        return None

    # -- derived bundles -------------------------------------------------

    def with_x509_authority(self, certificate: x509.Certificate) -> TrustBundle:
        return replace(self, x509_authorities=(*self.x509_authorities, certificate))

    def without_x509_authority(self, certificate: x509.Certificate) -> TrustBundle:
        der = certificate.public_bytes(Encoding.DER)
        kept = tuple(c for c in self.x509_authorities if c.public_bytes(Encoding.DER) != der)
        return replace(self, x509_authorities=kept)

    def with_jwt_authority(self, authority: JwtAuthority) -> TrustBundle:
        return replace(self, jwt_authorities=(*self.jwt_authorities, authority))

    def without_jwt_authority(self, kid: str) -> TrustBundle:
        return replace(self, jwt_authorities=tuple(a for a in self.jwt_authorities if a.kid != kid))

    def with_sequence(self, sequence: int | None) -> TrustBundle:
        return replace(self, sequence=sequence)

    # -- SPIFFE bundle format ---------------------------------------------

    def to_spiffe_dict(self) -> dict[str, Any]:
        keys: list[dict[str, Any]] = []
        for cert in self.x509_authorities:
            try:
                members = public_jwk_members(cert.public_key())
            except UnsupportedAlgorithmError as e:
                raise BundleError(f"cannot publish X.509 authority: {e.message}") from e
            entry: dict[str, Any] = {"use": USE_X509_SVID, **members}
            entry["x5c"] = [base64.b64encode(cert.public_bytes(Encoding.DER)).decode("ascii")]
            keys.append(entry)
        for auth in self.jwt_authorities:
            jwk = auth.jwk()
            # The SPIFFE format requires `use`; consumers ignore entries without it.
            # So a key without `use` (a plain JWKS key, valid for WITs and JWT-SVIDs)
            # is published as `jwt-svid` and, once reloaded, no longer verifies WITs:
            # give WIT keys `use: wit-svid` before saving a SPIFFE bundle.
            jwk.setdefault("use", USE_JWT_SVID)
            keys.append(jwk)
        out: dict[str, Any] = {"keys": keys}
        if self.sequence is not None:
            out["spiffe_sequence"] = self.sequence
        if self.refresh_hint is not None:
            out["spiffe_refresh_hint"] = self.refresh_hint
        return out

    def to_spiffe_json(self) -> str:
        return json.dumps(self.to_spiffe_dict(), indent=2)

    @classmethod
    def from_spiffe_json(
        cls, trust_domain: TrustDomain, data: bytes | str | Mapping[str, Any]
    ) -> TrustBundle:
        """Parse a SPIFFE bundle. Entries with an unknown or missing ``use`` are
        ignored, as the spec requires."""
        return _parse(trust_domain, data, spiffe=True)

    @classmethod
    def from_jwks(
        cls, trust_domain: TrustDomain, data: bytes | str | Mapping[str, Any]
    ) -> TrustBundle:
        """Parse a plain JWKS (e.g. an OIDC ``jwks_uri`` document) as JWT authorities.

        Keys without ``use`` are taken as they are and other ``use`` values are
        preserved; ``enc`` keys are skipped (they never sign), and ``x509-svid``
        entries become X.509 authorities.
        """
        return _parse(trust_domain, data, spiffe=False)

    @classmethod
    def load(cls, trust_domain: TrustDomain, path: str | os.PathLike[str]) -> TrustBundle:
        """Read a SPIFFE bundle JSON file."""
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_BUNDLE_BYTES + 1)
        except OSError as e:
            raise BundleError(f"cannot read bundle file {os.fspath(path)!r}: {e.strerror}") from e
        return cls.from_spiffe_json(trust_domain, data)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the SPIFFE bundle JSON atomically (readers never see half a file)."""
        target = Path(path)
        text = self.to_spiffe_json() + "\n"
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o644)  # a bundle is public; readers may be other users
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as e:
            raise BundleError(f"cannot write bundle file {str(target)!r}: {e.strerror}") from e


# -- parsing ----------------------------------------------------------------


def _load_json(data: bytes | str | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(data, Mapping):
        return data
    if not isinstance(data, (bytes, str)):
        raise BundleError(f"bundle data must be bytes, str or a mapping, not {type(data).__name__}")
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleError(f"bundle is larger than {MAX_BUNDLE_BYTES} bytes")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"bundle is not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise BundleError(f"bundle must be a JSON object, not {type(doc).__name__}")
    return doc


def _b64url_len(value: str) -> int:
    return len(value.rstrip("=")) * 3 // 4


def _key_from_jwk(entry: Mapping[str, Any], where: str) -> JwtPublicKey:
    kty = entry.get("kty")
    if kty == "oct":
        raise BundleError(f"{where}: symmetric ('oct') keys are not allowed in a trust bundle")
    if kty not in _KEY_MEMBERS:
        raise BundleError(f"{where}: unsupported key type {kty!r:.40} (EC, RSA or OKP expected)")
    members: dict[str, Any] = {"kty": kty}
    for name in _KEY_MEMBERS[kty]:
        value = entry.get(name)
        if not isinstance(value, str) or not value:
            raise BundleError(f"{where}: {kty} key member {name!r} is missing or not a string")
        members[name] = value
    if kty == "RSA" and _b64url_len(members["n"]) * 8 < MIN_RSA_BITS - 7:
        # checked before import so joserfc never sees (and warns about) a toy key
        raise BundleError(f"{where}: RSA key is shorter than {MIN_RSA_BITS} bits")
    try:
        imported = JWKRegistry.import_key(members)
        public = imported.public_key
    # KeyError: joserfc indexes its curve table with "crv" unchecked (seen with "P-999")
    except (JoseError, ValueError, TypeError, KeyError) as e:
        raise BundleError(f"{where}: invalid {kty} key: {e}") from e
    if not isinstance(public, _JWT_KEY_TYPES):
        raise BundleError(f"{where}: unsupported key ({type(public).__name__})")
    return public


def _x509_from_entry(entry: Mapping[str, Any], where: str) -> x509.Certificate | None:
    x5c = entry.get("x5c")
    if x5c is None or x5c == []:
        return None  # spec: entries without x5c MUST be ignored
    if not isinstance(x5c, list) or not isinstance(x5c[0], str):
        raise BundleError(f"{where}: 'x5c' must be a list of base64 strings")
    # Spec: only the first certificate counts; the rest MUST be ignored.
    try:
        der = base64.b64decode(x5c[0], validate=True)
        cert = x509.load_der_x509_certificate(der)
    except (binascii.Error, ValueError) as e:
        raise BundleError(f"{where}: 'x5c' does not hold a DER certificate: {e}") from e
    try:
        cert_members = public_jwk_members(cert.public_key())
    except UnsupportedAlgorithmError as e:
        raise BundleError(f"{where}: unsupported certificate key: {e.message}") from e
    # The JWK members and the certificate must describe the same key (go-jose
    # checks the same); otherwise two consumers could trust different keys.
    for name, value in cert_members.items():
        if entry.get(name) != value:
            raise BundleError(
                f"{where}: JWK member {name!r} does not match the x5c certificate's public key"
            )
    return cert


def _parse(
    trust_domain: TrustDomain, data: bytes | str | Mapping[str, Any], *, spiffe: bool
) -> TrustBundle:
    if not isinstance(trust_domain, TrustDomain):
        raise BundleError(f"trust_domain must be a TrustDomain, not {type(trust_domain).__name__}")
    doc = _load_json(data)
    keys = doc.get("keys")
    if not isinstance(keys, list):
        raise BundleError("bundle has no 'keys' list")
    sequence = _check_uint(doc.get("spiffe_sequence"), "spiffe_sequence")
    refresh_hint = _check_uint(doc.get("spiffe_refresh_hint"), "spiffe_refresh_hint")

    certs: list[x509.Certificate] = []
    authorities: list[JwtAuthority] = []
    for i, entry in enumerate(keys):
        where = f"bundle key {i}"
        if not isinstance(entry, dict):
            raise BundleError(f"{where} is not a JSON object")
        leaked = [m for m in _PRIVATE_MEMBERS if m in entry]
        if leaked:
            raise BundleError(
                f"{where} holds private key material ({', '.join(leaked)}); "
                "a trust bundle must contain public keys only"
            )
        use = entry.get("use")
        if use is not None and not isinstance(use, str):
            raise BundleError(f"{where}: 'use' must be a string")
        if use == USE_X509_SVID:
            cert = _x509_from_entry(entry, where)
            if cert is not None:
                certs.append(cert)
            continue
        if spiffe and use not in (USE_JWT_SVID, USE_WIT_SVID):
            continue  # spec 4.2.2: unknown `use` values MUST be ignored
        if not spiffe and use == "enc":
            continue
        kty = entry.get("kty")
        if not isinstance(kty, str) or not kty:
            raise BundleError(f"{where}: a key needs a 'kty'")
        if kty != "oct" and kty not in _KEY_MEMBERS:
            # SPIFFE bundle spec 4.2.1 (and RFC 7517 section 5): an entry whose
            # key type is not understood is ignored, not fatal, so a peer that
            # starts publishing a new key type does not break federation.
            # Symmetric keys stay an error (_key_from_jwk): they never belong here.
            continue
        kid = entry.get("kid")
        if not isinstance(kid, str) or not kid:
            raise BundleError(f"{where}: a JWT authority needs a non-empty 'kid'")
        alg = entry.get("alg")
        if alg is not None and not isinstance(alg, str):
            raise BundleError(f"{where}: 'alg' must be a string")
        authorities.append(JwtAuthority(kid, _key_from_jwk(entry, where), use=use, alg=alg))
    return TrustBundle(trust_domain, tuple(certs), tuple(authorities), sequence, refresh_hint)


# -- federation ---------------------------------------------------------------


class BundleSet:
    """Trust bundles of many trust domains, one per domain.

    Updates swap in a new dict (copy on write), so readers on other threads
    always see either the old or the new set, never a half-updated one.
    """

    def __init__(self, bundles: Iterable[TrustBundle] = ()) -> None:
        self._bundles: dict[TrustDomain, TrustBundle] = {}
        for bundle in bundles:
            self.add(bundle)

    def add(self, bundle: TrustBundle) -> None:
        """Add ``bundle``, replacing any bundle of the same trust domain."""
        if not isinstance(bundle, TrustBundle):
            raise BundleError(f"expected a TrustBundle, not {type(bundle).__name__}")
        self._bundles = {**self._bundles, bundle.trust_domain: bundle}

    def remove(self, trust_domain: TrustDomain) -> None:
        self._bundles = {td: b for td, b in self._bundles.items() if td != trust_domain}

    def get(self, trust_domain: TrustDomain) -> TrustBundle | None:
        return self._bundles.get(trust_domain)

    def trust_domains(self) -> tuple[TrustDomain, ...]:
        return tuple(self._bundles)

    def __contains__(self, trust_domain: object) -> bool:
        return trust_domain in self._bundles

    def __iter__(self) -> Iterator[TrustBundle]:
        return iter(tuple(self._bundles.values()))

    def __len__(self) -> int:
        return len(self._bundles)

    def __repr__(self) -> str:
        return f"BundleSet({', '.join(td.name for td in self._bundles)})"


__all__ = [
    "USE_JWT_SVID",
    "USE_WIT_SVID",
    "USE_X509_SVID",
    "BundleSet",
    "JwtAuthority",
    "JwtPublicKey",
    "TrustBundle",
]
