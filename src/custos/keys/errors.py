"""Errors of the key-custody layer. Each failure a caller must tell apart has its own class."""

from __future__ import annotations

from custos.errors import CustosError


class KeyStoreError(CustosError):
    """Any key-custody failure."""

    code = "key_store_error"


class KeyNotFoundError(KeyStoreError):
    code = "key_not_found"


class KeyExistsError(KeyStoreError):
    code = "key_exists"


class UnsupportedAlgorithmError(KeyStoreError):
    code = "unsupported_algorithm"


class AuthenticationError(KeyStoreError):
    """The device refused our credentials (wrong PIN). Never carries the PIN itself."""

    code = "device_authentication_failed"


class DeviceUnavailableError(KeyStoreError):
    """The TPM or token cannot be reached (absent, killed, unplugged)."""

    code = "device_unavailable"


class ExportRefusedError(KeyStoreError):
    """Someone asked for private key bytes of a non-exportable key."""

    code = "export_refused"


class InvalidKeyNameError(KeyStoreError):
    code = "invalid_key_name"


class StoreConfigError(KeyStoreError):
    code = "key_store_config"


class StoreClosedError(KeyStoreError):
    """A call on a store (or async facade) after its ``close()``."""

    code = "store_closed"


class KeyFileError(KeyStoreError):
    """A key file in the store's directory is not a key this store can use
    (not a regular file, too large, corrupt, a key type or algorithm it does not hold)."""

    code = "bad_key_file"


class KeyNotCustodyGradeError(KeyStoreError):
    """A device key that custody cannot vouch for: imported rather than generated on the
    device, or with a private value the device would let out (PKCS#11: not CKA_LOCAL,
    not CKA_NEVER_EXTRACTABLE, not CKA_SENSITIVE, or CKA_EXTRACTABLE)."""

    code = "key_not_custody_grade"
