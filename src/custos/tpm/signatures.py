"""TPMT_SIGNATURE: the signing schemes we ask for, and the signature in JOSE or DER form."""

from __future__ import annotations

import struct
from typing import Any

from tpm2_pytss.constants import TPM2_ALG, TPM2_RH, TPM2_ST
from tpm2_pytss.types import TPMS_SCHEME_HASH, TPMT_SIG_SCHEME, TPMT_TK_HASHCHECK, TPMU_SIG_SCHEME

from custos.keys.algorithms import Algorithm
from custos.keys.signatures import raw_to_der
from custos.tpm.errors import TpmError
from custos.tpm.templates import HASH_ALGS

#: The algorithms a TPM key of ours signs with.
TPM_ALGORITHMS = (Algorithm.ES256, Algorithm.ES384, Algorithm.RS256, Algorithm.PS256)


def sig_scheme(alg: Algorithm) -> Any:
    """The TPMT_SIG_SCHEME for ``alg`` (TPM2_Sign, TPM2_Quote, TPM2_Certify)."""
    spec = alg.spec
    if alg not in TPM_ALGORITHMS or spec.hash_name is None:
        raise TpmError(f"no TPM signing scheme for {alg.value}")
    kind = TPM2_ALG.ECDSA if spec.family == "ec" else (
        TPM2_ALG.RSAPSS if spec.pss else TPM2_ALG.RSASSA
    )  # fmt: skip
    return TPMT_SIG_SCHEME(
        scheme=kind,
        details=TPMU_SIG_SCHEME(any=TPMS_SCHEME_HASH(hashAlg=HASH_ALGS[spec.hash_name])),
    )


# Built once: constructing a TPMT_SIG_SCHEME through tpm2-pytss costs ~30 µs and the
# NULL ticket ~8 µs (measured), against a ~700-900 µs TPM2_Sign on swtpm. ESAPI only
# reads them (const inputs); callers use them under their context's lock.
SCHEMES: dict[Algorithm, Any] = {alg: sig_scheme(alg) for alg in TPM_ALGORITHMS}
#: The "digest was not made by the TPM" ticket TPM2_Sign wants for unrestricted keys.
NULL_TICKET = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)
# (sigAlg, hashAlg) a TPMT_SIGNATURE must carry for each algorithm.
_SIG_IDS: dict[Algorithm, tuple[int, int]] = {
    alg: (int(scheme.scheme), int(scheme.details.any.hashAlg)) for alg, scheme in SCHEMES.items()
}


def _tpm2b(raw: bytes, offset: int) -> tuple[bytes, int]:
    if offset + 2 > len(raw):
        raise TpmError("the TPM returned a truncated signature")
    (size,) = struct.unpack_from(">H", raw, offset)
    end = offset + 2 + size
    if end > len(raw):
        raise TpmError("the TPM returned a truncated signature")
    return raw[offset + 2 : end], end


def jose_signature(alg: Algorithm, sig: Any) -> bytes:
    """TPMT_SIGNATURE -> JOSE form (ECDSA: fixed-width r||s; RSA: the signature bytes).

    Parsed from the structure's marshalled form (TPM 2.0 Part 2, TPMT_SIGNATURE:
    ``sigAlg``, ``hash``, then TPM2B ``r`` and ``s`` for ECDSA or one TPM2B for
    RSA) rather than through tpm2-pytss attribute access, which builds wrapper
    objects per field and cost ~80 µs per signature here (marshal: ~5 µs).
    A signature of another scheme or hash than ``alg`` is refused.
    """
    raw = bytes(sig.marshal())
    if len(raw) < 4 or struct.unpack_from(">HH", raw) != _SIG_IDS[alg]:
        raise TpmError(f"the TPM returned a signature of another scheme than {alg.value}")
    spec = alg.spec
    if spec.family == "ec":
        # The TPM may return r or s shorter than the coordinate size (leading zeros).
        size = spec.coordinate_size
        r, offset = _tpm2b(raw, 4)
        s, _ = _tpm2b(raw, offset)
        if len(r) > size or len(s) > size:
            raise TpmError("the TPM returned an oversized ECDSA signature")
        return r.rjust(size, b"\0") + s.rjust(size, b"\0")
    signature, _ = _tpm2b(raw, 4)
    return signature


def der_signature(alg: Algorithm, sig: Any) -> bytes:
    """TPMT_SIGNATURE -> the form X.509 and ``cryptography`` verify: ECDSA as a DER
    ``Ecdsa-Sig-Value``, RSA as the signature bytes."""
    raw = jose_signature(alg, sig)
    if alg.spec.family == "ec":
        return raw_to_der(raw, alg.spec.coordinate_size)
    return raw


__all__ = [
    "NULL_TICKET",
    "SCHEMES",
    "TPM_ALGORITHMS",
    "der_signature",
    "jose_signature",
    "sig_scheme",
]
