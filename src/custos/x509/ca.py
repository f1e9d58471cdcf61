"""Issuance: an X.509 CA for one trust domain, issuing X509-SVIDs (SPIFFE X509-SVID spec).

Verification of SVIDs lives in :mod:`custos.x509.verify`; PEM/DER parsing of
certificates from users in :mod:`custos.x509.pem`.

The CA key is any ``cryptography`` private-key object, including a custos
device key (``store.get(name).private_key()``) whose private half stays in a
TPM or HSM: this module signs only through ``CertificateBuilder.sign`` and
never asks the key for private material.

Profile (what SPIRE issues, checked against the spec):

- CA: basicConstraints cA=TRUE (critical), keyUsage keyCertSign+cRLSign
  (critical), the trust domain's SPIFFE ID as URI SAN, SKI, AKI.
- SVID: exactly one URI SAN (the SPIFFE ID, whatever the CSR asked for),
  cA=FALSE (critical), keyUsage digitalSignature (+keyEncipherment for RSA)
  (critical), EKU serverAuth+clientAuth, optional DNS SANs, lifetime clamped
  to the CA's, random 128-bit serial, SKI, AKI.
"""

from __future__ import annotations

import functools
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from os import PathLike

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from custos._files import read_small_file
from custos.identity.errors import InvalidIdentifierError
from custos.identity.ids import SpiffeId, TrustDomain
from custos.keys.cryptography_keys import DeviceRSAPrivateKey
from custos.x509._time import utcnow
from custos.x509.errors import CsrError, X509CaError

#: Certificates start this long before "now", so a peer whose clock is a little
#: behind still accepts a certificate issued this instant (SPIRE does the same).
BACKDATE = timedelta(seconds=10)
MIN_RSA_BITS = 2048
#: CSRs are a few hundred bytes; refuse to parse megabytes from a caller.
MAX_CSR_BYTES = 64 * 1024
_ALLOWED_CURVES = ("secp256r1", "secp384r1")
# RFC 1035 LDH labels (with an optional leading wildcard label), lowercase or not.
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")

#: CA keys are EC or RSA.  Ed25519 is refused: cryptography's path validator
#: (Web PKI profile) rejects Ed25519 CA certificates, as do many TLS stacks, so
#: SVIDs under such a CA would not verify.  (Ed25519 *leaf* keys are fine.)
CaPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _check_ca_key(key: object) -> None:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise X509CaError(f"RSA CA key has {key.key_size} bits; at least {MIN_RSA_BITS} needed")
        return
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raise X509CaError(
            "Ed25519 CA keys are not supported: RFC 5280 validators with the Web PKI profile "
            "(cryptography's, many TLS stacks) refuse Ed25519 CA certificates; use EC or RSA"
        )
    raise X509CaError(f"unsupported CA key type {type(key).__name__} (EC or RSA)")


def _utcnow(now: datetime | None) -> datetime:
    return utcnow(now, X509CaError)


def _spki(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _random_serial() -> int:
    # 128 random bits; never 0 (RFC 5280 wants a positive serial).
    return secrets.randbits(128) or 1


_CertHash = hashes.SHA256 | hashes.SHA384 | hashes.SHA512


def _signing_params(key: CaPrivateKey) -> tuple[_CertHash, padding.PSS | None]:
    """Hash (and RSA padding) the CA key signs certificates with.

    Device keys sign one scheme only (the one they were created for), so the
    hash follows the curve: P-256 -> SHA-256, P-384 -> SHA-384; an RSA device
    key made for PS256 gets PSS with a digest-length salt (what the stores use).
    """
    if isinstance(key, ec.EllipticCurvePrivateKey):
        name = key.curve.name
        if name == "secp384r1":
            return hashes.SHA384(), None
        if name == "secp521r1":
            return hashes.SHA512(), None
        return hashes.SHA256(), None
    if isinstance(key, rsa.RSAPrivateKey):
        if isinstance(key, DeviceRSAPrivateKey) and key.store_key.alg.spec.pss:
            salt = padding.PSS.DIGEST_LENGTH
            return hashes.SHA256(), padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=salt)
    return hashes.SHA256(), None


def _sign(builder: x509.CertificateBuilder, key: CaPrivateKey) -> x509.Certificate:
    algorithm, pss = _signing_params(key)
    try:
        if pss is not None:
            return builder.sign(key, algorithm, rsa_padding=pss)
        return builder.sign(key, algorithm)
    except (ValueError, TypeError) as e:
        raise X509CaError(f"could not sign the certificate: {e}") from e


def _default_ca_subject(trust_domain: TrustDomain) -> x509.Name:
    # A random serialNumber keeps subjects of successive CAs (root, its
    # intermediates, rotations) distinct, so path building never confuses them;
    # SPIRE does the same with its x500UniqueIdentifier.
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "custos"),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, secrets.token_hex(16)),
        ]
    )


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return bc.ca


def _is_self_issued(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject


def _ski(cert: x509.Certificate) -> x509.SubjectKeyIdentifier:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key())


def _check_dns_name(name: str) -> str:
    if not isinstance(name, str) or not name or len(name) > 253 or not name.isascii():
        raise X509CaError(f"invalid DNS name {name!r:.80}")
    labels = name.split(".")
    if labels[0] == "*":
        labels = labels[1:]
        if len(labels) < 2:
            raise X509CaError(f"wildcard DNS name needs at least two more labels: {name!r}")
    if not labels or not all(_DNS_LABEL.match(label) for label in labels):
        raise X509CaError(f"invalid DNS name {name!r:.80}")
    return name


def check_csr_key(key: object) -> None:
    """Refuse a CSR key the CA does not certify (EC P-256/P-384, RSA >= 2048, Ed25519
    only): a :class:`CsrError`.  Public so a caller can check before it spends
    anything on a request (node attestation checks before a join token is used)."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in _ALLOWED_CURVES:
            raise CsrError(f"CSR EC key on curve {key.curve.name}; allowed: P-256, P-384")
        return
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise CsrError(f"CSR RSA key has {key.key_size} bits; at least {MIN_RSA_BITS} needed")
        return
    if isinstance(key, ed25519.Ed25519PublicKey):
        return
    raise CsrError(
        f"CSR key type {type(key).__name__} not allowed (EC P-256/P-384, RSA >= 2048, Ed25519)"
    )


def load_csr(data: bytes) -> x509.CertificateSigningRequest:
    """Parse a CSR given as PEM or DER; anything else is a :class:`CsrError`."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CsrError(f"CSR must be bytes, not {type(data).__name__}")
    raw = bytes(data)
    if len(raw) > MAX_CSR_BYTES:
        raise CsrError(f"CSR is larger than {MAX_CSR_BYTES} bytes")
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(raw)
        return x509.load_der_x509_csr(raw)
    except ValueError as e:
        raise CsrError(f"malformed CSR: {e}") from e


def load_csr_file(path: str | PathLike[str]) -> x509.CertificateSigningRequest:
    """Read and parse a CSR file (PEM or DER) named by a user.

    Only a regular file of at most :data:`MAX_CSR_BYTES` is read (a FIFO or
    ``/dev/zero`` is refused, see :mod:`custos._files`).
    """
    return load_csr(read_small_file(path, max_bytes=MAX_CSR_BYTES, what="CSR file"))


@dataclass(frozen=True)
class X509Svid:
    """An issued X509-SVID: the leaf and the intermediates up to (not including) the root."""

    spiffe_id: SpiffeId
    cert_chain: tuple[x509.Certificate, ...]

    @property
    def leaf(self) -> x509.Certificate:
        return self.cert_chain[0]

    @property
    def expires_at(self) -> datetime:
        return self.leaf.not_valid_after_utc

    def to_pem(self) -> bytes:
        return b"".join(c.public_bytes(Encoding.PEM) for c in self.cert_chain)

    def to_der_chain(self) -> bytes:
        """Concatenated DER certificates, leaf first (the Workload API's form)."""
        return b"".join(c.public_bytes(Encoding.DER) for c in self.cert_chain)


class CertificateAuthority:
    """A signing CA of one trust domain.

    ``chain`` is this CA's certificate followed by the certificates above it,
    the root last (a self-signed CA's chain is just its certificate).
    """

    def __init__(
        self,
        key: CaPrivateKey,
        chain: Sequence[x509.Certificate],
        trust_domain: TrustDomain | None = None,
    ) -> None:
        _check_ca_key(key)
        if not chain:
            raise X509CaError("a CA needs its certificate")
        cert = chain[0]
        if _spki(key.public_key()) != _spki(cert.public_key()):
            raise X509CaError("the CA key does not match the CA certificate")
        if not _is_ca(cert):
            raise X509CaError("the CA certificate is not a CA (basicConstraints cA is not TRUE)")
        if trust_domain is None:
            trust_domain = _trust_domain_of(cert)
        self._key = key
        self._chain = tuple(chain)
        self._trust_domain = trust_domain
        # What every certificate this CA signs repeats, read from the CA certificate
        # once here rather than once per certificate: a batch of 100 SVIDs parsed the
        # CA's subject, SKI, validity and chain 100 times (issue 8, "Speed").
        self._subject = cert.subject
        self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(_ski(cert))
        self._not_before = cert.not_valid_before_utc
        self._not_after = cert.not_valid_after_utc
        self._intermediates = tuple(c for c in self._chain if not _is_self_issued(c))

    # -- construction ---------------------------------------------------------

    @classmethod
    def self_signed(
        cls,
        key: CaPrivateKey,
        trust_domain: TrustDomain,
        *,
        ttl: timedelta,
        subject: x509.Name | None = None,
        path_length: int | None = None,
        now: datetime | None = None,
    ) -> CertificateAuthority:
        """A new root CA whose certificate is signed by ``key`` itself."""
        return cls._create(key, trust_domain, None, ttl, subject, path_length, now)

    @classmethod
    def intermediate(
        cls,
        key: CaPrivateKey,
        trust_domain: TrustDomain,
        parent: CertificateAuthority,
        ttl: timedelta,
        *,
        subject: x509.Name | None = None,
        path_length: int | None = None,
        now: datetime | None = None,
    ) -> CertificateAuthority:
        """A new intermediate CA for ``key``, signed by ``parent`` (lifetime clamped to it)."""
        return cls._create(key, trust_domain, parent, ttl, subject, path_length, now)

    @classmethod
    def _create(
        cls,
        key: CaPrivateKey,
        trust_domain: TrustDomain,
        parent: CertificateAuthority | None,
        ttl: timedelta,
        subject: x509.Name | None,
        path_length: int | None,
        now: datetime | None,
    ) -> CertificateAuthority:
        """A CA certificate for ``key``: self-signed without ``parent``, else signed by it."""
        _check_ca_key(key)
        current = _utcnow(now)
        name = subject if subject is not None else _default_ca_subject(trust_domain)
        public = key.public_key()
        if parent is None:
            if ttl <= timedelta(0):
                raise X509CaError("CA ttl must be positive")
            validity = (current - BACKDATE, current + ttl)
        else:
            validity = parent._validity(current, ttl)
        builder = _builder(
            name,
            public,
            validity,
            parent,
            x509.BasicConstraints(ca=True, path_length=path_length),
            _key_usage(ca=True),
            [x509.UniformResourceIdentifier(trust_domain.id_string())],
        )
        if parent is None:
            return cls(key, (_sign(builder, key),), trust_domain)
        return cls(key, (_sign(builder, parent._key), *parent.chain), trust_domain)

    # -- accessors ----------------------------------------------------------------

    @property
    def trust_domain(self) -> TrustDomain:
        return self._trust_domain

    @property
    def certificate(self) -> x509.Certificate:
        return self._chain[0]

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        return self._chain

    @property
    def root(self) -> x509.Certificate:
        """The top of the chain: the certificate a trust bundle publishes."""
        return self._chain[-1]

    @property
    def intermediates(self) -> tuple[x509.Certificate, ...]:
        """The chain without self-issued roots: what an SVID carries after its leaf."""
        return self._intermediates

    @property
    def not_after(self) -> datetime:
        return self._not_after

    def _validity(self, now: datetime, ttl: timedelta) -> tuple[datetime, datetime]:
        if ttl <= timedelta(0):
            raise X509CaError("ttl must be positive")
        ca_not_before = self._not_before
        ca_not_after = self._not_after
        if now >= ca_not_after:
            raise X509CaError(f"the CA certificate expired at {ca_not_after.isoformat()}")
        if now < ca_not_before:
            raise X509CaError(f"the CA certificate is not valid before {ca_not_before.isoformat()}")
        return max(now - BACKDATE, ca_not_before), min(now + ttl, ca_not_after)

    # -- issuance -------------------------------------------------------------------

    def sign_x509_svid(
        self,
        csr_der_or_pem: bytes,
        spiffe_id: SpiffeId,
        ttl: timedelta,
        dns_names: Sequence[str] = (),
        *,
        now: datetime | None = None,
    ) -> X509Svid:
        """Issue an X509-SVID for the key in ``csr_der_or_pem``.

        Only the CSR's public key is used (after its signature proves possession
        of the private key); its subject and requested extensions are ignored.
        """
        csr = load_csr(csr_der_or_pem)
        try:
            signature_ok = csr.is_signature_valid
        except (ValueError, TypeError) as e:
            raise CsrError(f"cannot check the CSR signature: {e}") from e
        if not signature_ok:
            raise CsrError("CSR signature is invalid (no proof of possession of the key)")
        try:
            public = csr.public_key()
        except ValueError as e:
            raise CsrError(f"CSR public key cannot be read: {e}") from e
        check_csr_key(public)
        assert isinstance(
            public, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey, ed25519.Ed25519PublicKey)
        )

        if not isinstance(spiffe_id, SpiffeId):
            raise X509CaError(f"spiffe_id must be a SpiffeId, not {type(spiffe_id).__name__}")
        if not spiffe_id.is_member_of(self._trust_domain):
            raise X509CaError(
                f"{spiffe_id} is not in this CA's trust domain {self._trust_domain.name!r}"
            )
        if not spiffe_id.path:
            raise X509CaError("an X509-SVID's SPIFFE ID must have a path (spec 3.1)")
        names = [_check_dns_name(n) for n in dns_names]

        validity = self._validity(_utcnow(now), ttl)
        subject = _SVID_SUBJECT
        if names and len(names[0]) <= 64:
            # CN = first DNS name, as SPIRE does, for clients that still read
            # CN; X.520 caps CN at 64 characters, so longer names live only
            # in the SAN.
            subject = x509.Name([*_SVID_SUBJECT, x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
        sans += [x509.DNSName(n) for n in names]
        builder = _builder(
            subject,
            public,
            validity,
            self,
            _SVID_BASIC_CONSTRAINTS,
            # keyEncipherment for RSA keys as SPIRE sets it (TLS RSA key exchange)
            _key_usage(ca=False, key_encipherment=isinstance(public, rsa.RSAPublicKey)),
            sans,
            _SVID_EKU,
        )
        leaf = _sign(builder, self._key)
        return X509Svid(spiffe_id, (leaf, *self._intermediates))


# The SVID profile's fixed parts (immutable cryptography values), built once.
_SVID_SUBJECT = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "custos")])
_SVID_BASIC_CONSTRAINTS = x509.BasicConstraints(ca=False, path_length=None)
_SVID_EKU = x509.ExtendedKeyUsage(
    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
)


@functools.cache  # four possible values, each immutable: built once, not per certificate
def _key_usage(*, ca: bool, key_encipherment: bool = False) -> x509.KeyUsage:
    """keyCertSign + cRLSign for a CA, digitalSignature for an SVID (the profile above)."""
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _builder(
    subject: x509.Name,
    public: CertificatePublicKeyTypes,
    validity: tuple[datetime, datetime],
    issuer: CertificateAuthority | None,
    basic_constraints: x509.BasicConstraints,
    key_usage: x509.KeyUsage,
    sans: list[x509.GeneralName],
    eku: x509.ExtendedKeyUsage | None = None,
) -> x509.CertificateBuilder:
    """Every certificate custos issues, CA or SVID, in one extension order.

    Without ``issuer`` the certificate is self-issued: its issuer name is its
    subject and its AKI is its own key's.
    """
    not_before, not_after = validity
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if issuer is None else issuer._subject)
        .public_key(public)
        .serial_number(_random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(basic_constraints, critical=True)
        .add_extension(key_usage, critical=True)
    )
    if eku is not None:
        builder = builder.add_extension(eku, critical=False)
    ski = x509.SubjectKeyIdentifier.from_public_key(public)
    # A self-issued certificate's AKI is its own SKI (RFC 5280 4.2.1.1).
    aki = (
        x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        if issuer is None
        else issuer._aki
    )
    return (
        builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(aki, critical=False)
    )


def _trust_domain_of(cert: x509.Certificate) -> TrustDomain:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise X509CaError(
            "the CA certificate has no SPIFFE ID URI SAN; pass trust_domain explicitly"
        ) from None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        try:
            return SpiffeId.parse(uri).trust_domain
        except InvalidIdentifierError:
            continue
    raise X509CaError("the CA certificate has no SPIFFE ID URI SAN; pass trust_domain explicitly")


__all__ = [
    "BACKDATE",
    "MAX_CSR_BYTES",
    "MIN_RSA_BITS",
    "CaPrivateKey",
    "CertificateAuthority",
    "X509Svid",
    "check_csr_key",
    "load_csr",
    "load_csr_file",
]
