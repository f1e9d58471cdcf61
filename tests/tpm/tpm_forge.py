"""Hand-built TPM evidence for tests: a software "AK" whose public area claims to be a
restricted TPM key, and TPMS_ATTEST structures it signs.

A real TPM never signs a TPMS_ATTEST without TPM_GENERATED_VALUE with a restricted key,
so tests of the checks after the signature (magic, type, trailing bytes...) need a key
whose signature verifies over any bytes: this one.  Built with tpm2-pytss types and
marshalled by tpm2-tss, like the real thing.
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from tpm2_pytss.constants import TPM2_ALG, TPM2_GENERATED, TPM2_ST, TPMA_OBJECT
from tpm2_pytss.types import (
    TPM2B_PUBLIC,
    TPML_PCR_SELECTION,
    TPMS_ATTEST,
    TPMS_CERTIFY_INFO,
    TPMS_CLOCK_INFO,
    TPMS_QUOTE_INFO,
    TPMS_SIGNATURE_ECC,
    TPMT_SIGNATURE,
    TPMU_ATTEST,
    TPMU_SIGNATURE,
)

from custos.tpm.templates import AK_ATTRIBUTES, ak_template


class SoftAk:
    """An ECC P-256 software key with an AK's public area (attributes configurable)."""

    def __init__(self, attributes: TPMA_OBJECT = AK_ATTRIBUTES) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        numbers = self.key.public_key().public_numbers()
        area = ak_template()
        area.objectAttributes = attributes
        area.unique.ecc.x = numbers.x.to_bytes(32, "big")
        area.unique.ecc.y = numbers.y.to_bytes(32, "big")
        self.public = TPM2B_PUBLIC(publicArea=area)

    def sign(self, data: bytes) -> bytes:
        """A marshalled TPMT_SIGNATURE (ECDSA-SHA256) over ``data``."""
        r, s = decode_dss_signature(self.key.sign(data, ec.ECDSA(hashes.SHA256())))
        sig = TPMT_SIGNATURE(
            sigAlg=TPM2_ALG.ECDSA,
            signature=TPMU_SIGNATURE(
                ecdsa=TPMS_SIGNATURE_ECC(
                    hash=TPM2_ALG.SHA256,
                    signatureR=r.to_bytes(32, "big"),
                    signatureS=s.to_bytes(32, "big"),
                )
            ),
        )
        return bytes(sig.marshal())


def pcr_digest(values: list[bytes]) -> bytes:
    return hashlib.sha256(b"".join(values)).digest()


def quote_attest(
    nonce: bytes,
    selection: str,
    digest: bytes,
    *,
    clock: tuple[int, int, int] = (1000, 1, 0),
    magic: int = int(TPM2_GENERATED.VALUE),
) -> bytes:
    """A marshalled TPMS_ATTEST of type quote."""
    attest = TPMS_ATTEST(
        magic=magic,
        type=TPM2_ST.ATTEST_QUOTE,
        extraData=nonce,
        clockInfo=TPMS_CLOCK_INFO(
            clock=clock[0], resetCount=clock[1], restartCount=clock[2], safe=1
        ),
        firmwareVersion=0x2023,
        attested=TPMU_ATTEST(
            quote=TPMS_QUOTE_INFO(pcrSelect=TPML_PCR_SELECTION.parse(selection), pcrDigest=digest)
        ),
    )
    return bytes(attest.marshal())


def certify_attest(name: bytes, *, kind: int = int(TPM2_ST.ATTEST_CERTIFY)) -> bytes:
    """A marshalled TPMS_ATTEST of type certify for the object ``name``."""
    attest = TPMS_ATTEST(
        magic=TPM2_GENERATED.VALUE,
        type=kind,
        extraData=b"",
        clockInfo=TPMS_CLOCK_INFO(clock=1, resetCount=1, restartCount=0, safe=1),
        attested=TPMU_ATTEST(certify=TPMS_CERTIFY_INFO(name=name, qualifiedName=name)),
    )
    return bytes(attest.marshal())
