"""The endorsement key: its certificates in NV and its public key.

The manufacturer (or ``swtpm_setup --create-ek-cert``) writes EK certificates at
the NV indices of the TCG EK Credential Profile; the EK itself is a primary of the
endorsement hierarchy, recreated on demand from the profile's template (and the
template / nonce indices next to the certificate, when the TPM has them), so its
public key matches the certificate.  All reads; nothing is written.
"""

from __future__ import annotations

from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from tpm2_pytss import TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_CAP
from tpm2_pytss.types import TPM2B_SENSITIVE_CREATE
from tpm2_pytss.utils import NVReadEK, create_ek_template

from custos.tpm.errors import TpmError, is_device_loss

#: TCG EK Credential Profile NV indices of the EK certificates custos reads: the
#: low-range RSA-2048 and ECC P-256 ones, and the high-range P-384 one swtpm uses.
EK_CERT_INDICES: dict[str, int] = {
    "rsa2048": 0x01C00002,
    "ecc-p256": 0x01C0000A,
    "ecc-p384": 0x01C00016,
}
#: The TCG platform certificate index.
PLATFORM_CERT_INDEX = 0x01C08000

# tpm2-pytss' names of the EK Credential Profile templates behind those indices.
_EK_TEMPLATES = {"rsa2048": "EK-RSA2048", "ecc-p256": "EK-ECC256", "ecc-p384": "EK-HIGH-ECC384"}

# TPM_PT_NV_BUFFER_MAX (TPM 2.0 Part 2, 6.13): the largest chunk TPM2_NV_Read returns.
_PT_NV_BUFFER_MAX = 0x12C
#: No NV index this module reads is larger (EK certificates are 1-2 KiB).
MAX_NV_BYTES = 16 * 1024


def der_prefix(data: bytes) -> bytes:
    """The leading DER element of ``data``: NV indices are often padded past the cert.

    Hand-written (8 lines) because cryptography rejects trailing bytes and offers no
    "parse one element" call.
    """
    if len(data) < 2 or data[0] != 0x30:
        return data
    first = data[1]
    if first < 0x80:
        return data[: 2 + first]
    n = first & 0x7F
    length = int.from_bytes(data[2 : 2 + n], "big")
    return data[: 2 + n + length]


def read_nv(ectx: Any, index: int) -> bytes | None:
    """The whole contents of an NV index (at most :data:`MAX_NV_BYTES`), or None when
    it is not defined."""
    try:
        handle = ectx.tr_from_tpmpublic(index)
    except TSS2_Exception as e:
        if is_device_loss(e):
            raise
        return None
    try:
        nv_public, _ = ectx.nv_read_public(handle)
        size = int(nv_public.nvPublic.dataSize)
        if size > MAX_NV_BYTES:
            raise TpmError(f"NV index {index:#010x} holds {size} bytes; expected a certificate")
        _more, cap = ectx.get_capability(TPM2_CAP.TPM_PROPERTIES, _PT_NV_BUFFER_MAX, 1)
        chunk = int(cap.data.tpmProperties[0].value) or 512
        data = b""
        while len(data) < size:
            part = bytes(ectx.nv_read(handle, min(chunk, size - len(data)), len(data)))
            if not part:  # a broken TPM answering nothing would loop here forever
                raise TpmError(f"NV index {index:#010x}: the TPM returned no data")
            data += part
        return data
    finally:
        ectx.tr_close(handle)


def _profile(profile: str) -> str:
    if profile not in EK_CERT_INDICES:
        raise TpmError(f"unknown EK profile {profile!r}; one of {', '.join(EK_CERT_INDICES)}")
    return profile


def ek_certificate(ectx: Any, profile: str) -> x509.Certificate | None:
    """The EK certificate of ``profile`` ("rsa2048", "ecc-p256", "ecc-p384"), or None."""
    der = read_nv(ectx, EK_CERT_INDICES[_profile(profile)])
    if not der:
        return None
    try:
        return x509.load_der_x509_certificate(der_prefix(der))
    except ValueError as e:
        raise TpmError(f"the {profile} EK certificate in NV is not a certificate: {e}") from e


def ek_public_key(ectx: Any, profile: str) -> PublicKeyTypes:
    """The public key of the EK of ``profile``, recreated from its profile template.

    Takes one object slot while it runs (the EK primary is flushed before return).
    Needs the endorsement hierarchy's (default: empty) password.
    """
    try:
        _cert, template = create_ek_template(_EK_TEMPLATES[_profile(profile)], NVReadEK(ectx))
    except ValueError as e:  # a high-range profile without its certificate
        raise TpmError(f"this TPM has no {profile} EK ({e})") from e
    handle, public, *_ = ectx.create_primary(
        TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT
    )
    try:
        return serialization.load_der_public_key(public.to_der())
    finally:
        ectx.flush_context(handle)


__all__ = [
    "EK_CERT_INDICES",
    "MAX_NV_BYTES",
    "PLATFORM_CERT_INDEX",
    "der_prefix",
    "ek_certificate",
    "ek_public_key",
    "read_nv",
]
