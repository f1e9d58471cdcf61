"""The one key-custody interface every backend implements.

A :class:`KeyStore` owns named keys inside some custody boundary (a TPM, a
PKCS#11 token, this process).  Callers create, find, list and delete keys, ask
for the public half, and ask the store to sign.  Private key material never
crosses this interface; only :class:`custos.keys.software.ExportableKeyStore`
adds an explicit export call, for the SPIFFE-compatible tier.

Backends implement a few narrow primitives (``_sign_digest`` for ECDSA/RSA,
``_sign_message`` for EdDSA, ...); the base class does name and algorithm
checks, hashing and encodings once so every backend behaves the same.
"""

from __future__ import annotations

import builtins
import re
from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from custos.keys.algorithms import HASHERS as _HASHERS
from custos.keys.algorithms import Algorithm
from custos.keys.cryptography_keys import device_private_key
from custos.keys.errors import InvalidKeyNameError, UnsupportedAlgorithmError
from custos.keys.jwk import public_jwk

# hashlib rather than custos.keys.algorithms.digest (cryptography's Hash): see HASHERS.
_DIGEST_SIZES: dict[Algorithm, int] = {
    alg: alg.spec.hash_algorithm().digest_size for alg in _HASHERS
}

# Names become file names (TPM key blobs) and CKA_LABELs: keep them boring.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_key_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name.endswith("."):
        raise InvalidKeyNameError(
            "key names are 1-128 characters of A-Z a-z 0-9 . _ - starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class KeyInfo:
    """What a store knows about one key, without touching the device again."""

    name: str
    alg: Algorithm
    store: str


class KeyStore(ABC):
    """A custody boundary for named signing keys."""

    kind: ClassVar[str]
    #: algorithms this backend can create; a device may narrow it further at runtime.
    supported_algorithms: ClassVar[frozenset[Algorithm]]
    #: True when keys outlive the process (a new process finds them again).
    persistent: ClassVar[bool] = True

    # ---- public API -------------------------------------------------------

    def create(self, name: str, alg: Algorithm | str = Algorithm.ES256) -> KeyInfo:
        """Generate a new key inside the store. Fails if ``name`` exists."""
        check_key_name(name)
        algorithm = Algorithm.parse(alg)
        if algorithm not in self.supported_algorithms:
            raise UnsupportedAlgorithmError(
                f"the {self.kind} store cannot create {algorithm.value} keys; it supports "
                + ", ".join(sorted(a.value for a in self.supported_algorithms))
            )
        return self._create(name, algorithm)

    def info(self, name: str) -> KeyInfo:
        """Look a key up; raises :class:`KeyNotFoundError` when it does not exist."""
        return self._info(check_key_name(name))

    def get(self, name: str) -> StoreKey:
        return StoreKey(self, self.info(name))

    def list(self) -> list[KeyInfo]:
        return sorted(self._list(), key=lambda k: k.name)

    def delete(self, name: str) -> None:
        self._delete(check_key_name(name))

    def public_key(self, name: str) -> PublicKeyTypes:
        return self._public_key(self.info(name))

    def public_jwk(self, name: str) -> dict[str, Any]:
        info = self.info(name)
        return public_jwk(self._public_key(info), info.alg)

    def sign(self, name: str, data: bytes) -> bytes:
        """Sign ``data`` the way JOSE does for the key's algorithm.

        ECDSA returns raw ``r||s``; RSA returns the PKCS#1 v1.5 or PSS
        signature; EdDSA returns the 64-byte signature.
        """
        info = self.info(name)
        if info.alg is Algorithm.EdDSA:
            return self._sign_message(info, data)
        return self._sign_digest(info, _HASHERS[info.alg](data).digest())

    def sign_digest(self, name: str, hashed: bytes) -> bytes:
        """Sign a digest that the caller computed with the key's hash (not for EdDSA)."""
        info = self.info(name)
        if info.alg is Algorithm.EdDSA:
            raise UnsupportedAlgorithmError("EdDSA signs whole messages, not digests")
        expected = _DIGEST_SIZES[info.alg]
        if len(hashed) != expected:
            raise UnsupportedAlgorithmError(
                f"{info.alg.value} signs {expected}-byte digests, got {len(hashed)} bytes"
            )
        return self._sign_digest(info, hashed)

    @property
    def device_id(self) -> Hashable:
        """What identifies the device behind this store: stores with equal values
        share the device, and the async facade (:mod:`custos.keys.aio`) lets one
        call at a time reach it.  A backend whose stores share a device says so
        (PKCS#11: the library file; TPM: the TCTI); by default each store is its
        own device."""
        return ("store", id(self))

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op for software stores
        """Release device sessions and worker threads. Idempotent."""

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- what a backend implements ----------------------------------------

    @abstractmethod
    def _create(self, name: str, alg: Algorithm) -> KeyInfo: ...

    @abstractmethod
    def _info(self, name: str) -> KeyInfo: ...

    @abstractmethod
    def _list(self) -> builtins.list[KeyInfo]: ...

    @abstractmethod
    def _delete(self, name: str) -> None: ...

    @abstractmethod
    def _public_key(self, info: KeyInfo) -> PublicKeyTypes: ...

    @abstractmethod
    def _sign_digest(self, info: KeyInfo, hashed: bytes) -> bytes:
        """ECDSA (raw r||s) or RSA signature over a digest of the key's hash."""

    def _sign_message(self, info: KeyInfo, data: bytes) -> bytes:
        raise UnsupportedAlgorithmError(f"the {self.kind} store cannot sign EdDSA")


@dataclass(frozen=True)
class StoreKey:
    """A handle on one key in one store. Holds no key material."""

    store: KeyStore
    info: KeyInfo

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def alg(self) -> Algorithm:
        return self.info.alg

    def sign(self, data: bytes) -> bytes:
        return self.store.sign(self.info.name, data)

    def public_key(self) -> PublicKeyTypes:
        return self.store.public_key(self.info.name)

    def public_jwk(self) -> dict[str, Any]:
        return self.store.public_jwk(self.info.name)

    def private_key(
        self,
    ) -> ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey:
        """A ``cryptography`` private-key object that signs through the store.

        Hand it to joserfc, to ``CertificateSigningRequestBuilder.sign`` or to
        anything else that takes a ``cryptography`` key; its ``private_bytes``
        refuses.  (It is a :data:`custos.keys.cryptography_keys.DevicePrivateKey`.)
        """
        return device_private_key(self)


@contextmanager
def opened(store: KeyStore) -> Iterator[KeyStore]:
    try:
        yield store
    finally:
        store.close()
