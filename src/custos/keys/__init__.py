"""Key custody: one interface, device-backed and software backends.

Backends: ``tpm`` (:mod:`custos.keys.tpm`), ``pkcs11`` (:mod:`custos.keys.pkcs11`),
``memory`` and ``exportable`` (:mod:`custos.keys.software`).
"""

from custos.keys.algorithms import Algorithm
from custos.keys.base import KeyInfo, KeyStore, StoreKey
from custos.keys.config import KeyStoreConfig, open_key_store
from custos.keys.errors import (
    AuthenticationError,
    DeviceUnavailableError,
    ExportRefusedError,
    InvalidKeyNameError,
    KeyExistsError,
    KeyNotFoundError,
    KeyStoreError,
    StoreConfigError,
    UnsupportedAlgorithmError,
)
from custos.keys.software import ExportableKeyStore, MemoryKeyStore

__all__ = [
    "Algorithm",
    "AuthenticationError",
    "DeviceUnavailableError",
    "ExportRefusedError",
    "ExportableKeyStore",
    "InvalidKeyNameError",
    "KeyExistsError",
    "KeyInfo",
    "KeyNotFoundError",
    "KeyStore",
    "KeyStoreConfig",
    "KeyStoreError",
    "MemoryKeyStore",
    "StoreConfigError",
    "StoreKey",
    "UnsupportedAlgorithmError",
    "open_key_store",
]
