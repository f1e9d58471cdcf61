"""Public-area templates: the storage primary, workload signing keys, attestation keys.

Also the reverse: which JOSE algorithm a key's public area signs with.
"""

from __future__ import annotations

from tpm2_pytss.constants import TPM2_ALG, TPM2_ECC, TPMA_OBJECT
from tpm2_pytss.types import (
    TPMS_ECC_PARMS,
    TPMS_RSA_PARMS,
    TPMS_SCHEME_HASH,
    TPMT_ECC_SCHEME,
    TPMT_KDF_SCHEME,
    TPMT_PUBLIC,
    TPMT_RSA_SCHEME,
    TPMT_SYM_DEF_OBJECT,
    TPMU_ASYM_SCHEME,
    TPMU_PUBLIC_PARMS,
    TPMU_SYM_KEY_BITS,
    TPMU_SYM_MODE,
)

from custos.keys.algorithms import Algorithm
from custos.keys.errors import UnsupportedAlgorithmError
from custos.tpm.errors import BadKeyBlobError

#: The attributes every workload signing key has, and must have when loaded from disk:
#: generated in this TPM, never duplicable, usable with its (empty) password, signs.
KEY_ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.SIGN_ENCRYPT
)

#: Attributes a workload key must not have: restricted signing keys only sign TPM-made
#: data (they are attestation keys), and a key that also decrypts mixes two uses of
#: one secret.
FORBIDDEN_ATTRIBUTES = TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT

#: What a key this module creates has beyond the attributes checked at load: noDA.
#: Every use of a DA-protected object before an unorderly shutdown (swtpm or the
#: machine stopped without TPM2_Shutdown) counts one dictionary-attack failure, so a
#: few restarts locked every signature out for the lockout interval (1000 s on swtpm).
#: These keys have an empty password, so the DA protection guards nothing.  Not part
#: of KEY_ATTRIBUTES: key files made before it (without noDA) still load.
CREATE_ATTRIBUTES = TPMA_OBJECT.NODA

#: An attestation key: like a workload key, and restricted, so the TPM signs with it
#: only digests it made itself (TPM2_Quote, TPM2_Certify), never a caller's digest
#: that merely looks like a TPMS_ATTEST. go-attestation's and tpm2_createak's AK.
AK_ATTRIBUTES = KEY_ATTRIBUTES | TPMA_OBJECT.RESTRICTED

#: The storage primary our keys live under: tpm2-openssl's (and TSSPrivKey's) ECC
#: parent template (restricted decrypt, AES-128-CFB, P-256, noDA, empty unique), so
#: a "TSS2 PRIVATE KEY" with parent TPM2_RH_OWNER means the same key to them and to
#: us. A primary is a deterministic function of the owner seed and its template, so
#: every process that creates it gets the same key.
PARENT_TEMPLATE = TPMT_PUBLIC(
    type=TPM2_ALG.ECC,
    nameAlg=TPM2_ALG.SHA256,
    objectAttributes=TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.DECRYPT
    | TPMA_OBJECT.NODA
    | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN,
    authPolicy=b"",
    parameters=TPMU_PUBLIC_PARMS(
        eccDetail=TPMS_ECC_PARMS(
            symmetric=TPMT_SYM_DEF_OBJECT(
                algorithm=TPM2_ALG.AES,
                keyBits=TPMU_SYM_KEY_BITS(aes=128),
                mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB),
            ),
            scheme=TPMT_ECC_SCHEME(scheme=TPM2_ALG.NULL),
            curveID=TPM2_ECC.NIST_P256,
            kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
        ),
    ),
)

HASH_ALGS = {"sha256": TPM2_ALG.SHA256, "sha384": TPM2_ALG.SHA384}
_CURVE = {"P-256": TPM2_ECC.NIST_P256, "P-384": TPM2_ECC.NIST_P384}


def _ecdsa_parms(curve: TPM2_ECC, hash_alg: TPM2_ALG) -> TPMU_PUBLIC_PARMS:
    return TPMU_PUBLIC_PARMS(
        eccDetail=TPMS_ECC_PARMS(
            symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
            scheme=TPMT_ECC_SCHEME(
                scheme=TPM2_ALG.ECDSA,
                details=TPMU_ASYM_SCHEME(ecdsa=TPMS_SCHEME_HASH(hashAlg=hash_alg)),
            ),
            curveID=curve,
            kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
        )
    )


def key_template(alg: Algorithm) -> TPMT_PUBLIC:
    """The public template of a new workload signing key for ``alg``.

    The signing scheme is fixed in the key (ECDSA-SHA256/384, RSASSA- or
    RSAPSS-SHA256), so a PS256 key cannot be made to produce PKCS#1 v1.5
    signatures, and the algorithm can be read back from the public area alone.
    """
    spec = alg.spec
    if spec.family == "ec" and spec.hash_name and spec.curve_name:
        params = _ecdsa_parms(_CURVE[spec.curve_name], HASH_ALGS[spec.hash_name])
        kind = TPM2_ALG.ECC
    elif spec.family == "rsa" and spec.hash_name:
        scheme = TPM2_ALG.RSAPSS if spec.pss else TPM2_ALG.RSASSA
        details = TPMU_ASYM_SCHEME(anySig=TPMS_SCHEME_HASH(hashAlg=HASH_ALGS[spec.hash_name]))
        params = TPMU_PUBLIC_PARMS(
            rsaDetail=TPMS_RSA_PARMS(
                symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
                scheme=TPMT_RSA_SCHEME(scheme=scheme, details=details),
                keyBits=spec.rsa_bits,
                exponent=0,
            )
        )
        kind = TPM2_ALG.RSA
    else:
        raise UnsupportedAlgorithmError(f"the tpm store cannot create {alg.value} keys")
    return TPMT_PUBLIC(
        type=kind,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=KEY_ATTRIBUTES | CREATE_ATTRIBUTES,
        authPolicy=b"",
        parameters=params,
    )


def ak_template() -> TPMT_PUBLIC:
    """An attestation key: restricted ECDSA P-256 / SHA-256 signing key, empty auth."""
    return TPMT_PUBLIC(
        type=TPM2_ALG.ECC,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=AK_ATTRIBUTES | CREATE_ATTRIBUTES,
        authPolicy=b"",
        parameters=_ecdsa_parms(TPM2_ECC.NIST_P256, TPM2_ALG.SHA256),
    )


def algorithm_of(public: TPMT_PUBLIC) -> Algorithm:
    """The JOSE algorithm a TPM key signs with, read from its public area.

    ECC: by curve. RSA: by the scheme fixed in the key; an RSA key with a NULL
    scheme (e.g. made by tpm2-openssl) is taken as RS256.
    """
    if public.type == TPM2_ALG.ECC:
        curve = public.parameters.eccDetail.curveID
        if curve == TPM2_ECC.NIST_P256:
            return Algorithm.ES256
        if curve == TPM2_ECC.NIST_P384:
            return Algorithm.ES384
        raise BadKeyBlobError(f"unsupported ECC curve {curve!s}")
    if public.type == TPM2_ALG.RSA:
        if public.parameters.rsaDetail.keyBits != 2048:
            raise BadKeyBlobError("only RSA-2048 TPM keys are supported")
        scheme = public.parameters.rsaDetail.scheme.scheme
        if scheme == TPM2_ALG.RSAPSS:
            return Algorithm.PS256
        if scheme in (TPM2_ALG.RSASSA, TPM2_ALG.NULL):
            return Algorithm.RS256
        raise BadKeyBlobError(f"unsupported RSA scheme {scheme!s}")
    raise BadKeyBlobError(f"unsupported TPM key type {public.type!s}")


__all__ = [
    "AK_ATTRIBUTES",
    "CREATE_ATTRIBUTES",
    "FORBIDDEN_ATTRIBUTES",
    "HASH_ALGS",
    "KEY_ATTRIBUTES",
    "PARENT_TEMPLATE",
    "ak_template",
    "algorithm_of",
    "key_template",
]
