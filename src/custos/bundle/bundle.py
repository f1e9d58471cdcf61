"""Trust bundles: the X.509 and JWT authorities of one trust domain, and sets of
them for federation.

Format: SPIFFE Trust Domain and Bundle spec, section 4 — a JWK Set whose
entries carry ``use``: ``x509-svid`` (one CA certificate in ``x5c``, no
``kid``) or ``jwt-svid`` (a public key with a ``kid``), plus the top-level
``spiffe_sequence`` and ``spiffe_refresh_hint``.  ``wit-svid`` entries (WIMSE
Workload Identity Token authorities) are read like ``jwt-svid`` ones and keep
their ``use``, so a verifier can tell the two apart.

A key without ``use`` (a plain JWKS key, valid for JWT-SVIDs and WITs alike)
is published in a SPIFFE bundle once per use, ``jwt-svid`` and ``wit-svid``,
so a bundle saved from a JWKS verifies what the JWKS verified (decision 0015).
``TrustBundle.from_jwks(..., use="wit-svid")`` gives such keys one use instead.

JSON is read by the strict reader of :mod:`custos._jose` (duplicate members,
NaN, lone surrogates refused) and every JWK goes through its one public-key
import, which also refuses weak keys (small-order Ed25519 points, non-minimal
encodings, RSA under 2048 bits).  Files are read through
:func:`custos._files.read_small_file` (regular files only, bounded).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from custos._files import UnreadableFileError, read_small_file
from custos._jose import (
    PRIVATE_MEMBERS,
    JoseError,
    check_public_key,
    import_public_jwk,
    loads_strict,
)
from custos.bundle.errors import BundleError
from custos.identity.errors import InvalidIdentifierError
from custos.identity.ids import TrustDomain, coerce_trust_domain
from custos.keys.errors import UnsupportedAlgorithmError
from custos.keys.jwk import public_jwk_members, thumbprint

USE_X509_SVID = "x509-svid"
USE_JWT_SVID = "jwt-svid"
USE_WIT_SVID = "wit-svid"

#: Public keys a JWT authority may hold.
JwtPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey

#: The key types a bundle entry may have; entries of other types are ignored.
_KEY_TYPES = frozenset({"EC", "RSA", "OKP"})
#: The uses a key without one is published under in a SPIFFE bundle.
_JWT_USES = (USE_JWT_SVID, USE_WIT_SVID)
#: Bundles are small (a few keys); this bounds what a hostile endpoint can make us parse.
MAX_BUNDLE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, eq=False)
class JwtAuthority:
    """A key that signs JWT-SVIDs (or, with ``use="wit-svid"``, WITs) in a trust domain."""

    kid: str
    public_key: JwtPublicKey
    use: str | None = None
    alg: str | None = None
    #: RFC 7638 thumbprint of ``public_key``, computed once (identity, dedupe)
    thumbprint: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.kid, str) or not self.kid:
            raise BundleError("a JWT authority needs a non-empty 'kid'")
        try:
            # The same weak-key rules as a JWK in a bundle file or a cnf key.
            check_public_key(self.public_key)
        except JoseError as e:
            raise BundleError(f"JWT authority {self.kid!r:.80}: {e.message}") from e
        # A derived field, set once here: cryptography's keys are not
        # hashable, and the thumbprint identifies the key itself.
        object.__setattr__(self, "thumbprint", thumbprint(self.public_key))

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
        return (self.kid, self.use, self.alg, self.thumbprint)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, JwtAuthority):
            return NotImplemented
        return self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash(self._identity())


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


class _KidKeys:
    """The keys seen under one ``kid``: by ``use``, and all distinct ones."""

    def __init__(self) -> None:
        self.by_use: dict[str | None, str] = {}
        self.distinct: set[str] = set()

    def conflicts(self, auth: JwtAuthority) -> bool:
        """Whether a lookup by this kid (and use) could return ``auth`` or
        another key; ``use=None`` matches every use."""
        if auth.use is None:
            return bool(self.distinct - {auth.thumbprint})
        return any(
            self.by_use.get(use, auth.thumbprint) != auth.thumbprint for use in (auth.use, None)
        )

    def add(self, auth: JwtAuthority) -> None:
        self.by_use.setdefault(auth.use, auth.thumbprint)
        self.distinct.add(auth.thumbprint)


def _dedupe_jwt(authorities: Iterable[JwtAuthority]) -> tuple[JwtAuthority, ...]:
    # Linear: a federated bundle is another domain's document, and the
    # pairwise version cost minutes for a few thousand entries.
    out: dict[JwtAuthority, None] = {}
    kids: dict[str, _KidKeys] = {}
    for auth in authorities:
        if not isinstance(auth, JwtAuthority):
            raise BundleError(f"JWT authorities must be JwtAuthority, not {type(auth).__name__}")
        if auth in out:
            continue
        seen = kids.setdefault(auth.kid, _KidKeys())
        if seen.conflicts(auth):
            # Two different keys that a lookup by kid (and use) could both
            # return would make signature checks depend on list order.
            raise BundleError(f"two different keys share kid {auth.kid!r} in one bundle")
        seen.add(auth)
        out[auth] = None
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
        # frozen: normalise through object.__setattr__ (a trust domain may be
        # given as the string a user has; any iterable, stored as tuples)
        object.__setattr__(self, "trust_domain", _trust_domain(self.trust_domain))
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
            if auth.use is not None:
                keys.append(jwk)
                continue
            # The SPIFFE format requires `use` (consumers ignore entries
            # without it) and has no "any": a key valid for both JWT-SVIDs and
            # WITs is published once per use, as SPIFFE bundles do, so the
            # reloaded bundle verifies what this one did (decision 0015).
            keys.extend({**jwk, "use": use} for use in _JWT_USES)
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
        cls, trust_domain: TrustDomain | str, data: bytes | str | Mapping[str, Any]
    ) -> TrustBundle:
        """Parse a SPIFFE bundle. Entries with an unknown or missing ``use`` are
        ignored, as the spec requires."""
        return _parse(trust_domain, data, spiffe=True)

    @classmethod
    def from_jwks(
        cls,
        trust_domain: TrustDomain | str,
        data: bytes | str | Mapping[str, Any],
        *,
        use: str | None = None,
    ) -> TrustBundle:
        """Parse a plain JWKS (e.g. an OIDC ``jwks_uri`` document) as JWT authorities.

        Keys without ``use`` are valid for JWT-SVIDs and WITs alike, unless
        ``use`` (``"jwt-svid"`` or ``"wit-svid"``) gives them that one use;
        other ``use`` values are preserved; ``enc`` keys are skipped (they
        never sign), and ``x509-svid`` entries become X.509 authorities.
        """
        if use is not None and use not in _JWT_USES:
            raise BundleError(f"use must be {USE_JWT_SVID!r} or {USE_WIT_SVID!r}, not {use!r:.40}")
        return _parse(trust_domain, data, spiffe=False, default_use=use)

    @classmethod
    def load(cls, trust_domain: TrustDomain | str, path: str | os.PathLike[str]) -> TrustBundle:
        """Read a SPIFFE bundle JSON file (a regular file of at most
        :data:`MAX_BUNDLE_BYTES`; anything else is a clear error)."""
        try:
            data = read_small_file(path, max_bytes=MAX_BUNDLE_BYTES, what="bundle file")
        except UnreadableFileError as e:
            raise BundleError(e.message, code="bundle_unreadable") from e
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


def _trust_domain(value: object) -> TrustDomain:
    try:
        return coerce_trust_domain(value)  # type: ignore[arg-type]
    except InvalidIdentifierError as e:
        raise BundleError(f"invalid trust domain: {e.message}") from e


def _load_json(data: bytes | str | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(data, Mapping):
        return data
    if not isinstance(data, (bytes, str)):
        raise BundleError(f"bundle data must be bytes, str or a mapping, not {type(data).__name__}")
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleError(f"bundle is larger than {MAX_BUNDLE_BYTES} bytes")
    try:
        return loads_strict(data)
    except ValueError as e:  # UnicodeDecodeError is one
        raise BundleError(f"bundle is not valid JSON (or not one strict JSON object): {e}") from e


def _key_from_jwk(entry: Mapping[str, Any], where: str) -> JwtPublicKey:
    if entry.get("kty") == "oct":
        raise BundleError(f"{where}: symmetric ('oct') keys are not allowed in a trust bundle")
    try:
        # Only the key's own members are judged there; use / kid / alg here.
        return import_public_jwk(entry)
    except JoseError as e:
        raise BundleError(f"{where}: invalid {entry.get('kty')} key: {e.message}") from e


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
    trust_domain: TrustDomain | str,
    data: bytes | str | Mapping[str, Any],
    *,
    spiffe: bool,
    default_use: str | None = None,
) -> TrustBundle:
    trust_domain = _trust_domain(trust_domain)
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
        leaked = [m for m in PRIVATE_MEMBERS if m in entry]
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
        if kty != "oct" and kty not in _KEY_TYPES:
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
        if use is None:
            use = default_use
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

    def remove(self, trust_domain: TrustDomain | str) -> None:
        trust_domain = _trust_domain(trust_domain)
        self._bundles = {td: b for td, b in self._bundles.items() if td != trust_domain}

    def get(self, trust_domain: TrustDomain | str) -> TrustBundle | None:
        """The bundle of ``trust_domain`` (a TrustDomain or ``"example.org"``)."""
        if type(trust_domain) is not TrustDomain:  # the per-request case skips this
            trust_domain = _trust_domain(trust_domain)
        return self._bundles.get(trust_domain)

    def trust_domains(self) -> tuple[TrustDomain, ...]:
        return tuple(self._bundles)

    def __contains__(self, trust_domain: object) -> bool:
        if isinstance(trust_domain, str):
            try:
                trust_domain = coerce_trust_domain(trust_domain)
            except InvalidIdentifierError:
                return False
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
