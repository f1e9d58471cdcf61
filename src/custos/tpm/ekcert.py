"""Trusting an endorsement key: by its certificate, or by its hash on an allowlist.

Server side, no TPM.  An EK is trusted when

- its certificate's public key *is* the EK's public key (strict, always: a
  certificate of another key is refused even if that EK would be allowlisted), and
  the certificate chains, through intermediates the agent sent (read from NV or
  shipped with the node), to a CA of the configured manufacturer bundle, every
  certificate of the path valid now (strict); or
- the SHA-256 of its DER SubjectPublicKeyInfo (the *EK hash*, also the agent ID
  and the ``ek_pubhash`` selector) is on the allowlist: a TPM without an EK
  certificate, or one from a manufacturer whose CA is not configured.

Real EK certificates are odd in ways a WebPKI verifier refuses; what is tolerated
and what stays strict is listed in docs/tpm-ek-certificates.md with a test each
(tests/tpm/test_ekcert.py), and the reasons in docs/decisions/0061.  In short, on
the EK certificate itself no extension is interpreted or required (a critical SAN,
an empty subject, no or another EKU, unknown critical TCG extensions are accepted:
the certificate's one job here is binding a key to a manufacturer CA); CA
certificates must be CAs (basicConstraints cA, keyCertSign when keyUsage is
present); signatures, validity and path length are cryptography's strict ones.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509 import verification as v
from cryptography.x509.oid import NameOID

from custos.tpm.verify import AttestationEvidenceError, spki_sha256

#: TCG EK Credential Profile: the SAN directoryName attribute of the TPM manufacturer.
TCG_AT_TPM_MANUFACTURER = x509.ObjectIdentifier("2.23.133.2.1")
#: More intermediates than this in one EK path is not a TPM vendor's PKI.
MAX_INTERMEDIATES = 8
#: Longest path from the EK certificate to a bundle CA, both included.
MAX_CHAIN_DEPTH = 6

#: An EK certificate is 1-2 KiB; NV indices hold at most a few.
MAX_CERT_BYTES = 8 * 1024

_MANUFACTURER_ID = re.compile(r"^id:([0-9A-Fa-f]{8})$")
_EK_HASH = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class EkVerdict:
    """Why an EK is trusted, and what its certificate says."""

    ek_hash: str
    #: The EK certificate's issuer CN (only when trusted via the certificate).
    issuer_cn: str | None
    #: TPM manufacturer as a TCG id ("id:49424D00"), from the certificate's SAN.
    manufacturer: str | None
    via: Literal["certificate", "allowlist"]


def _spki(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _ca_basic_constraints(_policy: Any, _cert: x509.Certificate, ext: Any) -> None:
    if ext is None or not ext.ca:
        raise ValueError("a CA certificate of the EK path is not a CA (basicConstraints)")


def _ca_key_usage(_policy: Any, _cert: x509.Certificate, ext: Any) -> None:
    if ext is not None and not ext.key_cert_sign:
        raise ValueError("a CA certificate of the EK path may not sign certificates")


# EK certificate: nothing required or interpreted (permit_all accepts any extension,
# critical or not, and does not look at EKU or SAN).
_EE_POLICY = v.ExtensionPolicy.permit_all()
# CAs of the path: must be CAs; everything else as the vendor made it (some lack
# AKI/SKI, which WebPKI's CA policy requires).
_CA_POLICY = (
    v.ExtensionPolicy.permit_all()
    .require_present(x509.BasicConstraints, v.Criticality.AGNOSTIC, _ca_basic_constraints)
    .may_be_present(x509.KeyUsage, v.Criticality.AGNOSTIC, _ca_key_usage)
)


def _der_length(data: bytes) -> int | None:
    """The length of the leading DER SEQUENCE of ``data`` (header included), or None."""
    if len(data) < 2 or data[0] != 0x30:
        return None
    first = data[1]
    if first < 0x80:
        return 2 + first
    n = first & 0x7F
    if not 1 <= n <= 2 or len(data) < 2 + n:
        return None
    return 2 + n + int.from_bytes(data[2 : 2 + n], "big")


def load_ek_certificate(der: bytes, *, what: str = "EK certificate") -> x509.Certificate:
    """Parse an EK (or intermediate) certificate from the wire or an NV index.

    Tolerant: padding after the certificate, as NV indices larger than the
    certificate hold, when it is all 0x00 or all 0xFF (the fill values TPMs and
    provisioning tools use).  Strict: the certificate itself must be DER
    (cryptography's parser; BER such as non-minimal lengths is refused: the
    signature covers the encoding, and re-encoding would mean a hand-written DER
    normalizer), at most :data:`MAX_CERT_BYTES`.  Code ``bad_ek_cert``.
    """
    data = bytes(der)
    if not data or len(data) > MAX_CERT_BYTES:
        raise AttestationEvidenceError(
            f"{what}: {len(data)} bytes (1 to {MAX_CERT_BYTES} expected)", code="bad_ek_cert"
        )
    end = _der_length(data)
    if end is not None and end < len(data):
        pad = data[end:]
        if pad.strip(b"\x00") and pad.strip(b"\xff"):
            raise AttestationEvidenceError(
                f"{what}: bytes after the certificate that are not NV padding",
                code="bad_ek_cert",
            )
        data = data[:end]
    try:
        return x509.load_der_x509_certificate(data)
    except (ValueError, x509.InvalidVersion) as e:  # InvalidVersion is no ValueError
        raise AttestationEvidenceError(
            f"{what} is not a DER certificate: {e}", code="bad_ek_cert"
        ) from e


def manufacturer_of(cert: x509.Certificate) -> str | None:
    """``id:XXXXXXXX`` (upper-case hex) from the SAN's tcg-at-tpmManufacturer, or None."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return None
    for name in san.get_values_for_type(x509.DirectoryName):
        for attr in name.get_attributes_for_oid(TCG_AT_TPM_MANUFACTURER):
            value = attr.value if isinstance(attr.value, str) else None
            match = _MANUFACTURER_ID.match(value or "")
            if match:
                return "id:" + match.group(1).upper()
    return None


def issuer_cn_of(cert: x509.Certificate) -> str | None:
    """The issuer's CN when it can be the ``ek_issuer:<cn>`` selector value, else None
    (a CN with control or format characters, or too long, is not reported: a selector
    could not hold it, and an odd CA name must not fail an attestation)."""
    from custos.identity.errors import InvalidIdentifierError
    from custos.identity.selector import check_selector_value

    names = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names or not isinstance(names[0].value, str):
        return None
    cn = names[0].value
    try:
        check_selector_value(f"ek_issuer:{cn}")
    except InvalidIdentifierError:
        return None
    return cn


#: RSA EKs: at least 2048 bits (TCG EK profile: RSA 2048 and 3072).
MIN_RSA_BITS = 2048
#: ECC EKs: the NIST curves of the TCG EK profile (P-256, P-384) and P-521.
EK_CURVES = ("secp256r1", "secp384r1", "secp521r1")


def check_ek_strength(key: PublicKeyTypes) -> None:
    """An EK MakeCredential may encrypt to: RSA of at least 2048 bits or ECC on a NIST
    P-256/384/521 curve (code ``ek_weak_key``): a credential encrypted to a factorable
    key proves nothing, whoever certified or allowlisted it."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size >= MIN_RSA_BITS:
            return
        why = f"an RSA key of {key.key_size} bits (at least {MIN_RSA_BITS})"
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name in EK_CURVES:
            return
        why = f"an ECC key on {key.curve.name} (one of {', '.join(EK_CURVES)})"
    else:
        why = f"a {type(key).__name__} (RSA or ECC)"
    raise AttestationEvidenceError(f"the endorsement key is {why}", code="ek_weak_key")


class EkTrust:
    """The server's EK trust: a manufacturer CA bundle and an EK-hash allowlist."""

    def __init__(self, ca_bundle: list[x509.Certificate], allowlist: frozenset[str]) -> None:
        bad = sorted(h for h in allowlist if not _EK_HASH.match(h))
        if bad:
            raise ValueError(
                f"EK allowlist entries must be lower-case hex SHA-256 digests: {bad[:3]}"
            )
        self.ca_bundle = list(ca_bundle)
        self.allowlist = frozenset(allowlist)
        self._store = v.Store(self.ca_bundle) if self.ca_bundle else None

    def _chain(
        self,
        cert: x509.Certificate,
        intermediates: list[x509.Certificate],
        now: datetime.datetime,
    ) -> str | None:
        """None when ``cert`` chains to the bundle; else why not."""
        if self._store is None:
            return "no EK CA bundle is configured"
        if len(intermediates) > MAX_INTERMEDIATES:
            return f"more than {MAX_INTERMEDIATES} intermediate certificates"
        verifier = (
            v.PolicyBuilder()
            .store(self._store)
            .time(now)
            .max_chain_depth(MAX_CHAIN_DEPTH)
            .extension_policies(ee_policy=_EE_POLICY, ca_policy=_CA_POLICY)
            .build_client_verifier()
        )
        try:
            verifier.verify(cert, intermediates)
        except v.VerificationError as e:
            return str(e)
        except (ValueError, TypeError, UnsupportedAlgorithm) as e:  # a key it cannot read
            return f"a certificate of the path cannot be checked: {e}"
        return None

    def check(
        self,
        ek_public_key: PublicKeyTypes,
        ek_cert: x509.Certificate | None,
        intermediates: list[x509.Certificate],
        *,
        now: datetime.datetime | None = None,
    ) -> EkVerdict:
        """Trust ``ek_public_key`` by certificate or allowlist, or refuse it.

        Codes: ``ek_key_mismatch`` (the certificate is of another key),
        ``ek_untrusted`` (no chain to the bundle and not allowlisted).
        """
        ek_hash = spki_sha256(ek_public_key)
        check_ek_strength(ek_public_key)
        why = "the TPM has no EK certificate"
        if ek_cert is not None:
            try:
                cert_spki = _spki(ek_cert.public_key())
            except (ValueError, TypeError, UnsupportedAlgorithm) as e:  # an unknown key type
                raise AttestationEvidenceError(
                    f"the EK certificate's public key cannot be read: {e}", code="ek_key_mismatch"
                ) from e
            if cert_spki != _spki(ek_public_key):
                raise AttestationEvidenceError(
                    "the EK certificate is for another key than the TPM's endorsement key",
                    code="ek_key_mismatch",
                )
            when = now or datetime.datetime.now(datetime.UTC)
            failure = self._chain(ek_cert, list(intermediates), when)
            if failure is None:
                return EkVerdict(
                    ek_hash=ek_hash,
                    issuer_cn=issuer_cn_of(ek_cert),
                    manufacturer=manufacturer_of(ek_cert),
                    via="certificate",
                )
            why = f"the EK certificate does not chain to the EK CA bundle ({failure})"
        if ek_hash in self.allowlist:
            return EkVerdict(ek_hash=ek_hash, issuer_cn=None, manufacturer=None, via="allowlist")
        raise AttestationEvidenceError(
            f"untrusted endorsement key {ek_hash}: {why}, and its hash is not on the allowlist",
            code="ek_untrusted",
        )


__all__ = [
    "EK_CURVES",
    "MAX_CERT_BYTES",
    "MAX_CHAIN_DEPTH",
    "MAX_INTERMEDIATES",
    "MIN_RSA_BITS",
    "TCG_AT_TPM_MANUFACTURER",
    "EkTrust",
    "EkVerdict",
    "check_ek_strength",
    "issuer_cn_of",
    "load_ek_certificate",
    "manufacturer_of",
]
