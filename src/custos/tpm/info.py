"""What a TPM says about itself: ``custos tpm info``.

Reads fixed properties (manufacturer, vendor string, firmware, spec revision), the
PCR banks that have PCRs allocated, and the EK certificates the manufacturer put
in NV (TCG EK Credential Profile indices). One short-lived ESAPI context; no keys
are created, nothing is written.
"""

from __future__ import annotations

from typing import Any

from cryptography import x509
from tpm2_pytss import TSS2_Exception
from tpm2_pytss.constants import TPM2_ALG, TPM2_CAP, TPM2_PT

from custos.keys.errors import DeviceUnavailableError
from custos.tpm.context import open_esapi
from custos.tpm.ek import EK_CERT_INDICES, PLATFORM_CERT_INDEX, der_prefix, read_nv
from custos.tpm.errors import TpmError, is_device_loss

# TPM_PT_* values (TPM 2.0 Part 2, 6.13) that tpm2-pytss 3.0 does not name.
PT_VENDOR_STRING = (0x106, 0x107, 0x108, 0x109)
PT_FIRMWARE_VERSION_1 = 0x10B
PT_FIRMWARE_VERSION_2 = 0x10C
# Fixed properties from TPM_PT_FAMILY_INDICATOR through FIRMWARE_VERSION_2, in one call.
_PT_FIRST = int(TPM2_PT.FAMILY_INDICATOR)
_PT_COUNT = PT_FIRMWARE_VERSION_2 - _PT_FIRST + 1


def _chars(value: int) -> str:
    """A 32-bit property holding 4 ASCII characters (manufacturer, vendor strings)."""
    raw = value.to_bytes(4, "big")
    return "".join(chr(b) for b in raw if 0x20 <= b < 0x7F).strip()


def _properties(ectx: Any) -> dict[int, int]:
    props: dict[int, int] = {}
    _more, cap = ectx.get_capability(TPM2_CAP.TPM_PROPERTIES, _PT_FIRST, _PT_COUNT)
    for p in cap.data.tpmProperties:
        props[int(p.property)] = int(p.value)
    return props


# tpm2-pytss spells SHA-1 "sha"; use the names tpm2-tools and the kernel use.
_BANK_NAMES = {
    int(TPM2_ALG.SHA1): "sha1",
    int(TPM2_ALG.SHA256): "sha256",
    int(TPM2_ALG.SHA384): "sha384",
    int(TPM2_ALG.SHA512): "sha512",
    int(TPM2_ALG.SM3_256): "sm3_256",
}


def _pcr_banks(ectx: Any) -> list[str]:
    _more, cap = ectx.get_capability(TPM2_CAP.PCRS, 0, 16)
    banks = []
    for sel in cap.data.assignedPCR:
        if any(bytes(sel.pcrSelect)[: sel.sizeofSelect]):
            banks.append(_BANK_NAMES.get(int(sel.hash), str(sel.hash)))
    return banks


def _cert_summary(der: bytes) -> dict[str, str]:
    try:
        cert = x509.load_der_x509_certificate(der_prefix(der))
    except ValueError as e:
        return {"error": f"unparseable certificate: {e}"}
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": format(cert.serial_number, "x"),
        "not_after": cert.not_valid_after_utc.isoformat(),
    }


def tpm_info(tcti: str) -> dict[str, Any]:
    """Manufacturer, firmware, PCR banks and EK certificates of the TPM at ``tcti``.

    Keys of the result: ``manufacturer`` (4-character vendor id, e.g. "IBM"),
    ``vendor`` (vendor strings), ``firmware_version`` (dotted, as
    ``major.minor.build.sub`` from the two 32-bit properties), ``firmware_raw``,
    ``spec`` (family/level/revision), ``pcr_banks`` (hashes with PCRs allocated),
    ``ek_certificates`` ({profile: {subject, issuer, serial, not_after}}), and
    ``ek_certificate_subject`` / ``ek_certificate_issuer`` (of the first one found,
    RSA first).
    """
    ectx = open_esapi(tcti)
    try:
        props = _properties(ectx)
        fw1 = props.get(PT_FIRMWARE_VERSION_1, 0)
        fw2 = props.get(PT_FIRMWARE_VERSION_2, 0)
        vendor = " ".join(_chars(props.get(pt, 0)) for pt in PT_VENDOR_STRING)
        info: dict[str, Any] = {
            "tcti": tcti,
            "manufacturer": _chars(props.get(int(TPM2_PT.MANUFACTURER), 0)),
            "vendor": " ".join(vendor.split()),
            "firmware_version": f"{fw1 >> 16}.{fw1 & 0xFFFF}.{fw2 >> 16}.{fw2 & 0xFFFF}",
            "firmware_raw": f"{fw1:08x}:{fw2:08x}",
            "spec": {
                "family": _chars(props.get(int(TPM2_PT.FAMILY_INDICATOR), 0)),
                "level": props.get(int(TPM2_PT.LEVEL), 0),
                "revision": props.get(int(TPM2_PT.REVISION), 0) / 100,
            },
            "pcr_banks": _pcr_banks(ectx),
        }
        certs: dict[str, dict[str, str]] = {}
        for profile, index in EK_CERT_INDICES.items():
            der = read_nv(ectx, index)
            if der:
                certs[profile] = _cert_summary(der)
        info["ek_certificates"] = certs
        first = next((c for c in certs.values() if "subject" in c), None)
        info["ek_certificate_subject"] = first["subject"] if first else None
        info["ek_certificate_issuer"] = first["issuer"] if first else None
        info["platform_certificate_present"] = read_nv(ectx, PLATFORM_CERT_INDEX) is not None
        return info
    except TSS2_Exception as e:
        if is_device_loss(e):
            raise DeviceUnavailableError(f"lost the TPM at {tcti!r} ({e})") from e
        raise TpmError(f"the TPM at {tcti!r} refused a read: {e}") from e
    finally:
        ectx.close()
