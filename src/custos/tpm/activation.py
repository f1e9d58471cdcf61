"""Credential activation: prove an AK lives in the same TPM as an EK.

The server (no TPM) encrypts a fresh secret to the EK with TPM2_MakeCredential's
algorithm, bound to the AK's *name* (:func:`make_credential`).  Only a TPM holding
the EK's private key can decrypt it, and TPM2_ActivateCredential releases it only
when the object named by the credential is loaded in that same TPM
(:func:`activate_credential`).  The agent returns the secret; equal to the one the
server kept means the AK is the EK's TPM's.  The name covers the AK's whole public
area, so its attributes (restricted, fixedTPM...) are proven too.

Object slots (swtpm has three, no resource manager): the shared context keeps its
storage primary loaded; activation loads the AK under it and recreates the EK
primary, so all three are in use for one command.  Keys the context keeps loaded
for signing are flushed first when the TPM says it is out of memory.  The EK is
flushed before returning, and so is the policy session.

The EK's authPolicy in the TCG EK Credential Profile low-range templates (RSA-2048,
ECC P-256) is PolicySecret(TPM_RH_ENDORSEMENT) ("PolicyA"): a policy session on which
TPM2_PolicySecret with the endorsement hierarchy's (empty) password was run.  The
high-range template of swtpm's ECC P-384 EK has PolicyB_SHA384 = PolicyOR(PolicyA,
PolicyC) in SHA-384: the same PolicySecret in a SHA-384 session, then TPM2_PolicyOR
over the two branch digests (docs/decisions/0059).
"""

from __future__ import annotations

import secrets
from typing import Any

from tpm2_pytss import TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_RC, TPM2_SE, TPMA_OBJECT
from tpm2_pytss.types import (
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPML_DIGEST,
    TPMT_SYM_DEF,
)
from tpm2_pytss.utils import NoSuchIndex, NVReadEK, create_ek_template
from tpm2_pytss.utils import make_credential as _tss_make_credential

from custos.tpm.blobs import KeyBlob
from custos.tpm.context import TpmContext
from custos.tpm.errors import TpmError, is_device_loss, tpm_rc
from custos.tpm.verify import AttestationEvidenceError

#: EK profiles (custos' names) and tpm2-pytss' names of their TCG templates.
EK_PROFILES: dict[str, str] = {
    "rsa2048": "EK-RSA2048",
    "ecc-p256": "EK-ECC256",
    "ecc-p384": "EK-HIGH-ECC384",
}
#: EK profiles activation works with.
ACTIVATION_PROFILES: dict[str, str] = dict(EK_PROFILES)

# TCG EK Credential Profile 2.x, B.6: the SHA-384 policy digests of the high-range
# templates' PolicyOR branches.  PolicyA = PolicySecret(TPM_RH_ENDORSEMENT); PolicyC
# = PolicyAuthorizeNV of the EK policy NV index.  Checked: PolicyOR(A, C) is the
# authPolicy of the template swtpm's P-384 EK is made from
# (tests/tpm/test_activation.py::test_high_range_policy_digests).
POLICY_A_SHA384 = bytes.fromhex(
    "8bbf2266537c171cb56e403c4dc1d4b64f432611dc386e6f532050c3278c930e"
    "143e8bb1133824ccb431053871c6db53"
)
POLICY_C_SHA384 = bytes.fromhex(
    "d6032ce61f2fb3c240eb3cf6a33237ef2b6a16f4293c22b455e261cffd217ad5"
    "b4947c2d73e63005eed2dc2b3593d165"
)
# profile -> (session hash, PolicyOR branches or None for PolicySecret alone)
_EK_POLICIES: dict[str, tuple[TPM2_ALG, tuple[bytes, ...] | None]] = {
    "rsa2048": (TPM2_ALG.SHA256, None),
    "ecc-p256": (TPM2_ALG.SHA256, None),
    "ecc-p384": (TPM2_ALG.SHA384, (POLICY_A_SHA384, POLICY_C_SHA384)),
}

#: Bytes of the secret the server sends (a SHA-256 digest's size: the EK's nameAlg).
SECRET_BYTES = 32
#: Upper bounds of the two marshalled blobs (TPM2B_ID_OBJECT: HMAC + encrypted
#: TPM2B_DIGEST; TPM2B_ENCRYPTED_SECRET: an RSA-2048 ciphertext or an ECC point).
MAX_CREDENTIAL_BLOB = 2 + 2 + 64 + 2 + 64
MAX_ENCRYPTED_SECRET = 2 + 512

# What an endorsement key's public area must say: a restricted decryption key
# generated in and bound to the TPM (every TCG EK template has these).
_EK_ATTRIBUTES = (
    TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.DECRYPT
    | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
)


class ActivationError(TpmError):
    """The TPM refused to activate the credential: it was not made for an AK and EK
    of this TPM, or the blobs are corrupt. Code ``activation_failed``."""

    code = "activation_failed"


def make_credential(ek_public: TPM2B_PUBLIC, ak_name: bytes) -> tuple[bytes, bytes, bytes]:
    """Server side: (secret, credential_blob, encrypted_secret) for ``ak_name`` under ``ek_public``.

    ``credential_blob`` is a marshalled TPM2B_ID_OBJECT, ``encrypted_secret`` a
    marshalled TPM2B_ENCRYPTED_SECRET: what :func:`activate_credential` takes.  The
    secret comes from :func:`secrets.token_bytes`.  An EK public area that is not a
    restricted decryption key, or of a kind MakeCredential cannot use, is
    :class:`AttestationEvidenceError` (code ``ek_unusable``).
    """
    area = ek_public.publicArea
    attrs = int(area.objectAttributes)
    if attrs & _EK_ATTRIBUTES != _EK_ATTRIBUTES or attrs & TPMA_OBJECT.SIGN_ENCRYPT:
        raise AttestationEvidenceError(
            "the endorsement key's public area is not a restricted decryption key "
            "(restricted, decrypt, fixedTPM, fixedParent, sensitiveDataOrigin; no sign)",
            code="ek_unusable",
        )
    if area.type not in (TPM2_ALG.RSA, TPM2_ALG.ECC):
        raise AttestationEvidenceError(
            "the endorsement key is neither RSA nor ECC", code="ek_unusable"
        )
    if not 2 <= len(ak_name) <= 2 + 64:
        raise AttestationEvidenceError("the AK name has an impossible length", code="bad_ak_name")
    secret = secrets.token_bytes(SECRET_BYTES)
    try:
        blob, encrypted = _tss_make_credential(ek_public, secret, ak_name)
    except (ValueError, TypeError, KeyError) as e:
        raise AttestationEvidenceError(
            f"cannot make a credential for this endorsement key: {e}", code="ek_unusable"
        ) from e
    return secret, bytes(blob.marshal()), bytes(encrypted.marshal())


def _default_template(profile: str) -> TPM2B_PUBLIC:
    """The TCG EK Credential Profile template of ``profile`` (no NV template index)."""

    def nv(index: Any) -> bytes:
        if int(index) in _DEFAULT_CERT_INDICES:
            return b""  # a high-range template needs "a certificate" to be looked up
        raise NoSuchIndex(int(index))

    _cert, template = create_ek_template(EK_PROFILES[profile], nv)
    return template


_DEFAULT_CERT_INDICES = frozenset({0x01C00002, 0x01C0000A, 0x01C00016})


def check_ek_template(ek_public: TPM2B_PUBLIC, profile: object) -> None:
    """Server side: the EK public area must be the TCG template of ``profile`` (the
    agent's ``ek_profile``) with only its key (``unique``) filled in; code ``ek_unusable``.

    An EK certificate (or the allowlist) vouches for a key, not for a public area: the
    nameAlg, symmetric algorithm, attributes and policy come from the agent.  A
    credential made for other parameters than the TPM's EK cannot be activated (swtpm
    answers one made for a SHA-384 nameAlg on the RSA-2048 EK with TPM_RC_FAILURE, "a
    TPM failure", for that command), so such areas are refused before a credential is
    made, with a clear code instead of a puzzling activation failure on the agent.
    Strict: an EK made from a template in NV (allowed by the TCG profile, not seen on
    a TPM yet) is refused too (docs/tpm-ek-certificates.md).
    """
    if not isinstance(profile, str) or profile not in ACTIVATION_PROFILES:
        raise AttestationEvidenceError(
            f"the EK profile must be one of {', '.join(ACTIVATION_PROFILES)}", code="ek_unusable"
        )
    want, got = _default_template(profile).publicArea, ek_public.publicArea
    same = (
        int(got.type) == int(want.type)
        and int(got.nameAlg) == int(want.nameAlg)
        and int(got.objectAttributes) == int(want.objectAttributes)
        and bytes(got.authPolicy) == bytes(want.authPolicy)
    )
    if same:
        if int(want.type) == int(TPM2_ALG.RSA):
            same = bytes(got.parameters.rsaDetail.marshal()) == bytes(
                want.parameters.rsaDetail.marshal()
            )
        else:
            same = bytes(got.parameters.eccDetail.marshal()) == bytes(
                want.parameters.eccDetail.marshal()
            )
    if not same:
        raise AttestationEvidenceError(
            f"the endorsement key's public area is not the TCG {profile} EK template "
            "(name algorithm, attributes, policy or parameters differ)",
            code="ek_unusable",
        )


def _ek_template(ectx: Any, profile: str, profiles: dict[str, str]) -> Any:
    if profile not in profiles:
        raise TpmError(f"EK profile {profile!r} cannot be used here; one of {', '.join(profiles)}")
    try:
        _cert, template = create_ek_template(profiles[profile], NVReadEK(ectx))
    except ValueError as e:  # a high-range profile without its NV template
        raise TpmError(f"this TPM has no {profile} EK ({e})") from e
    return template


def _create_ek(ctx: TpmContext, ectx: Any, template: Any) -> tuple[Any, Any]:
    """The EK primary (handle, TPM2B_PUBLIC); out of slots: flush our cached keys, retry."""

    def attempt() -> tuple[Any, Any]:
        handle, public, *_ = ectx.create_primary(
            TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT
        )
        return handle, public

    try:
        return attempt()
    except TSS2_Exception as e:
        if is_device_loss(e) or tpm_rc(e) != TPM2_RC.OBJECT_MEMORY:
            raise
        ctx.evict_all()
        return attempt()


def ek_public_area(ctx: TpmContext, profile: str) -> TPM2B_PUBLIC:
    """The EK's TPM2B_PUBLIC for ``profile`` (recreated; flushed before return).

    Send it with ``.marshal()``; the server parses it with
    :func:`custos.tpm.verify.parse_public`.
    """

    def op(ectx: Any) -> TPM2B_PUBLIC:
        handle, public = _create_ek(ctx, ectx, _ek_template(ectx, profile, EK_PROFILES))
        ctx.flush(handle)
        return public

    return ctx.device(op)


def _blob(cls: Any, data: bytes, limit: int, what: str) -> Any:
    if not isinstance(data, (bytes, bytearray)) or not 2 < len(data) <= limit:
        raise ActivationError(f"the {what} has an impossible size")
    try:
        value, used = cls.unmarshal(bytes(data))
    except TSS2_Exception as e:
        raise ActivationError(f"the {what} is malformed ({e})") from e
    if used != len(data):
        raise ActivationError(f"the {what} has trailing bytes")
    return value


def activate_credential(
    ctx: TpmContext,
    ak: KeyBlob,
    ek_profile: str,
    credential_blob: bytes,
    encrypted_secret: bytes,
) -> bytes:
    """Agent side: TPM2_ActivateCredential with ``ak`` and the EK of ``ek_profile``.

    Returns the secret.  A credential not made for this AK and this TPM's EK (or
    corrupt blobs) is :class:`ActivationError` (code ``activation_failed``); nothing
    stays loaded either way.
    """
    blob = _blob(TPM2B_ID_OBJECT, credential_blob, MAX_CREDENTIAL_BLOB, "credential blob")
    secret = _blob(
        TPM2B_ENCRYPTED_SECRET, encrypted_secret, MAX_ENCRYPTED_SECRET, "encrypted secret"
    )

    def op(ectx: Any) -> bytes:
        template = _ek_template(ectx, ek_profile, ACTIVATION_PROFILES)
        # The AK and the EK are loaded at once beside the storage primary: with a key
        # kept loaded that is swtpm's three slots and one more, and an RSA EK's
        # CreatePrimary refused for want of a slot costs its whole key derivation.
        # Activation is rare (a new AK): flush the cached keys first.
        ctx.evict_all()
        ak_handle = ctx.load_checked("attestation key", ak)
        try:
            ek_handle, _ = _create_ek(ctx, ectx, template)
            try:
                session_hash, branches = _EK_POLICIES[ek_profile]
                session = ectx.start_auth_session(
                    ESYS_TR.NONE,
                    ESYS_TR.NONE,
                    TPM2_SE.POLICY,
                    TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
                    session_hash,
                )
                try:
                    ectx.policy_secret(ESYS_TR.ENDORSEMENT, session)
                    if branches is not None:
                        ectx.policy_or(session, TPML_DIGEST(list(branches)))
                    try:
                        digest = ectx.activate_credential(
                            ak_handle, ek_handle, blob, secret,
                            session1=ESYS_TR.PASSWORD, session2=session,
                        )  # fmt: skip
                    except TSS2_Exception as e:
                        if is_device_loss(e):
                            raise
                        raise ActivationError(
                            f"the TPM refused to activate the credential ({e}): it was not "
                            "made for this attestation key and this TPM's endorsement key"
                        ) from e
                finally:
                    # continueSession is set: the session stays loaded after success too.
                    ctx.flush(session)
            finally:
                ctx.flush(ek_handle)
        finally:
            ctx.flush(ak_handle)
        return bytes(digest)

    result: bytes = ctx.device(op)
    return result


__all__ = [
    "ACTIVATION_PROFILES",
    "EK_PROFILES",
    "POLICY_A_SHA384",
    "POLICY_C_SHA384",
    "SECRET_BYTES",
    "ActivationError",
    "activate_credential",
    "ek_public_area",
    "make_credential",
]
