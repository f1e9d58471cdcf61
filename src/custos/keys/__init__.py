"""Key custody: one interface, device-backed and software backends.

Backends: ``tpm`` (:mod:`custos.keys.tpm`), ``pkcs11`` (:mod:`custos.keys.pkcs11`),
``memory`` and ``exportable`` (:mod:`custos.keys.software`); an asyncio facade
over any of them (:mod:`custos.keys.aio`).  Importing this package loads no device
library (tpm2-pytss, python-pkcs11): backends are imported when a store is opened.
"""

from custos.keys.aio import AsyncKeyStore
from custos.keys.algorithms import Algorithm
from custos.keys.base import KeyInfo, KeyStore, StoreKey
from custos.keys.config import KeyStoreConfig, open_key_store
from custos.keys.errors import (
    AuthenticationError,
    DeviceUnavailableError,
    ExportRefusedError,
    InvalidKeyNameError,
    KeyExistsError,
    KeyFileError,
    KeyNotCustodyGradeError,
    KeyNotFoundError,
    KeyStoreError,
    StoreClosedError,
    StoreConfigError,
    UnsupportedAlgorithmError,
)
from custos.keys.software import ExportableKeyStore, MemoryKeyStore

__all__ = [
    "Algorithm",
    "AsyncKeyStore",
    "AuthenticationError",
    "DeviceUnavailableError",
    "ExportRefusedError",
    "ExportableKeyStore",
    "InvalidKeyNameError",
    "KeyExistsError",
    "KeyFileError",
    "KeyInfo",
    "KeyNotCustodyGradeError",
    "KeyNotFoundError",
    "KeyStore",
    "KeyStoreConfig",
    "KeyStoreError",
    "MemoryKeyStore",
    "StoreClosedError",
    "StoreConfigError",
    "StoreKey",
    "UnsupportedAlgorithmError",
    "open_key_store",
]
