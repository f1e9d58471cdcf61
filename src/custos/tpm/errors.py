"""TPM errors, and how to tell a lost device from a TPM that said no."""

from __future__ import annotations

from tpm2_pytss import TSS2_Exception
from tpm2_pytss.constants import TPM2_RC, TSS2_RC

from custos.keys.errors import KeyFileError, KeyStoreError
from custos.tpm import _tss  # noqa: F401  (quiet libtss2 before its first call)


class TpmError(KeyStoreError):
    """The TPM answered, and refused (a TPM_RC other than a transport failure)."""

    code = "tpm_error"


class TpmSlotsExhaustedError(TpmError):
    """The TPM has no free object slot, even after we flushed the keys we keep loaded."""


class BadKeyBlobError(KeyFileError):
    """A TPM key file is not a key custos can use (unreadable, corrupt, wrong type or
    parent, restricted or duplicable, or not a key of this TPM). Code ``bad_key_file``."""


# TCTI/ESYS failures that mean "the device went away", as opposed to a TPM that
# answered with an error. After one of these the ESAPI context is unusable
# (measured: the next call fails with esys_rc_bad_sequence), so it is dropped.
_LOSS_BASES = {
    TSS2_RC.BASE_RC_IO_ERROR,
    TSS2_RC.BASE_RC_NO_CONNECTION,
    TSS2_RC.BASE_RC_TRY_AGAIN,
    TSS2_RC.BASE_RC_BAD_SEQUENCE,
    TSS2_RC.BASE_RC_MALFORMED_RESPONSE,
    TSS2_RC.BASE_RC_INSUFFICIENT_RESPONSE,
    TSS2_RC.BASE_RC_GENERAL_FAILURE,
}
_BASE_MASK = 0xFFFF

#: TPM answers to TPM2_Create that mean "this TPM does not do that algorithm".
UNSUPPORTED_RCS = frozenset(
    {TPM2_RC.CURVE, TPM2_RC.KEY_SIZE, TPM2_RC.SCHEME, TPM2_RC.ASYMMETRIC, TPM2_RC.HASH}
)


def _layer(rc: int) -> int:
    return rc & int(TSS2_RC.RC_LAYER_MASK)


def is_device_loss(e: TSS2_Exception) -> bool:
    """True when ``e`` is a transport failure (the TPM may be gone), not a TPM answer."""
    layer = _layer(e.rc)
    if layer == TSS2_RC.TCTI_RC_LAYER:
        return (e.rc & _BASE_MASK) not in (
            TSS2_RC.BASE_RC_BAD_VALUE, TSS2_RC.BASE_RC_NOT_SUPPORTED,
        )  # fmt: skip
    if layer in (TSS2_RC.ESAPI_RC_LAYER, TSS2_RC.SYS_RC_LAYER):
        return (e.rc & _BASE_MASK) in _LOSS_BASES
    return False


def tpm_rc(e: TSS2_Exception) -> int:
    """The TPM error with handle/parameter/session numbers stripped (0 if not a TPM rc)."""
    return int(e.error) if _layer(e.rc) == TSS2_RC.TPM_RC_LAYER else 0


__all__ = [
    "UNSUPPORTED_RCS",
    "BadKeyBlobError",
    "TpmError",
    "TpmSlotsExhaustedError",
    "is_device_loss",
    "tpm_rc",
]
