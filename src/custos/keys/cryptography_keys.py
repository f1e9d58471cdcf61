"""Device keys posing as ``cryptography`` private keys.

joserfc, ``CertificateSigningRequestBuilder.sign`` and ``CertificateBuilder.sign``
take a ``cryptography`` private-key object and call its ``sign`` method.  These
classes implement cryptography's abstract key interfaces by asking the key's
store to sign, so those libraries sign through the TPM or HSM unchanged.  Every
method that would reveal private material (``private_bytes``,
``private_numbers``, ECDH ``exchange``) raises :class:`ExportRefusedError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NoReturn

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric import utils as asym_utils

from custos.keys.algorithms import HASHERS, Algorithm
from custos.keys.errors import ExportRefusedError, UnsupportedAlgorithmError
from custos.keys.signatures import raw_to_der

if TYPE_CHECKING:
    # Annotations only: custos.keys.base imports this module at its top (StoreKey's
    # private_key() hands out these adapters), so a run-time import back would be a cycle.
    from custos.keys.base import StoreKey


def _refuse(what: str) -> NoReturn:
    raise ExportRefusedError(f"{what}: the private key stays in the device and cannot be exported")


def _digest_of(
    data: bytes, algorithm: hashes.HashAlgorithm | asym_utils.Prehashed, alg: Algorithm
) -> bytes:
    """What the store signs: ``data`` itself when the caller hashed it, else its hash,
    made with hashlib (callers checked first that ``algorithm`` is ``alg``'s hash)."""
    if isinstance(algorithm, asym_utils.Prehashed):
        return data
    return HASHERS[alg](data).digest()  # type: ignore[no-any-return]


def _hash_name(algorithm: hashes.HashAlgorithm | asym_utils.Prehashed) -> str:
    if isinstance(algorithm, asym_utils.Prehashed):
        return algorithm._algorithm.name
    return algorithm.name


class DeviceECPrivateKey(ec.EllipticCurvePrivateKey):
    """An ECDSA key that lives in a device."""

    def __init__(self, key: StoreKey) -> None:
        self._key = key
        self._public = key.public_key()
        if not isinstance(self._public, ec.EllipticCurvePublicKey):
            raise UnsupportedAlgorithmError("not an EC key")

    @property
    def store_key(self) -> StoreKey:
        return self._key

    def sign(
        self,
        data: bytes | bytearray | memoryview,
        signature_algorithm: ec.EllipticCurveSignatureAlgorithm,
    ) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise UnsupportedAlgorithmError("device EC keys sign ECDSA only")
        want = self._key.alg.spec.hash_name
        got = _hash_name(signature_algorithm.algorithm)
        if got != want:
            # The TPM key is created for one scheme+hash; signing another hash
            # would be refused by the device anyway. Fail early and clearly.
            raise UnsupportedAlgorithmError(
                f"this {self._key.alg.value} key signs {want}, not {got}"
            )
        hashed = _digest_of(bytes(data), signature_algorithm.algorithm, self._key.alg)
        raw = self._key.store.sign_digest(self._key.name, hashed)
        return raw_to_der(raw, self._key.alg.spec.coordinate_size)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        assert isinstance(self._public, ec.EllipticCurvePublicKey)
        return self._public

    @property
    def curve(self) -> ec.EllipticCurve:
        return self.public_key().curve

    @property
    def key_size(self) -> int:
        return self.curve.key_size

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        _refuse("ECDH exchange")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        _refuse("private_numbers")

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        _refuse("private_bytes")

    def __copy__(self) -> DeviceECPrivateKey:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> DeviceECPrivateKey:
        return self


class DeviceEd25519PrivateKey(ed25519.Ed25519PrivateKey):
    """An Ed25519 key that lives in a device (PKCS#11 CKM_EDDSA)."""

    def __init__(self, key: StoreKey) -> None:
        self._key = key
        pub = key.public_key()
        if not isinstance(pub, ed25519.Ed25519PublicKey):
            raise UnsupportedAlgorithmError("not an Ed25519 key")
        self._public = pub

    @property
    def store_key(self) -> StoreKey:
        return self._key

    def sign(self, data: bytes | bytearray | memoryview) -> bytes:
        return self._key.sign(bytes(data))

    def public_key(self) -> ed25519.Ed25519PublicKey:
        return self._public

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        _refuse("private_bytes")

    def private_bytes_raw(self) -> bytes:
        _refuse("private_bytes_raw")

    def __copy__(self) -> DeviceEd25519PrivateKey:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> DeviceEd25519PrivateKey:
        return self


def _check_pss_parameters(pss: padding.PSS, hash_algorithm: hashes.HashAlgorithm) -> None:
    """Devices sign PSS with MGF1 over the message hash and a digest-length salt (what
    JOSE PS256 and our CA use). Anything else would yield a signature that does not
    verify under the parameters the caller declared (e.g. in a CSR's AlgorithmIdentifier),
    so refuse it instead. cryptography exposes these only as private attributes."""
    mgf = getattr(pss, "_mgf", None)
    salt = getattr(pss, "_salt_length", None)
    mgf_hash = getattr(mgf, "_algorithm", None)
    if not isinstance(mgf, padding.MGF1) or getattr(mgf_hash, "name", None) != hash_algorithm.name:
        raise UnsupportedAlgorithmError(f"device PSS keys use MGF1 with {hash_algorithm.name}")
    if not (salt is padding.PSS.DIGEST_LENGTH or salt == hash_algorithm.digest_size):
        raise UnsupportedAlgorithmError(
            f"device PSS keys use a {hash_algorithm.digest_size}-byte salt (PSS.DIGEST_LENGTH)"
        )


class DeviceRSAPrivateKey(rsa.RSAPrivateKey):
    """An RSA key that lives in a device; signs with the scheme the key was made for."""

    def __init__(self, key: StoreKey) -> None:
        self._key = key
        pub = key.public_key()
        if not isinstance(pub, rsa.RSAPublicKey):
            raise UnsupportedAlgorithmError("not an RSA key")
        self._public = pub

    @property
    def store_key(self) -> StoreKey:
        return self._key

    def sign(
        self,
        data: bytes | bytearray | memoryview,
        padding_: padding.AsymmetricPadding,
        algorithm: asym_utils.Prehashed | hashes.HashAlgorithm | asym_utils.NoDigestInfo,
    ) -> bytes:
        if isinstance(algorithm, asym_utils.NoDigestInfo):
            raise UnsupportedAlgorithmError("device RSA keys sign with a DigestInfo")
        spec = self._key.alg.spec
        want_pss = spec.pss
        if isinstance(padding_, padding.PSS) != want_pss or not isinstance(
            padding_, (padding.PSS, padding.PKCS1v15)
        ):
            raise UnsupportedAlgorithmError(
                f"this {self._key.alg.value} key signs with {'PSS' if want_pss else 'PKCS#1 v1.5'}"
            )
        if _hash_name(algorithm) != spec.hash_name:
            raise UnsupportedAlgorithmError(f"this key signs {spec.hash_name}")
        if isinstance(padding_, padding.PSS):
            _check_pss_parameters(padding_, spec.hash_algorithm())
        hashed = _digest_of(bytes(data), algorithm, self._key.alg)
        return self._key.store.sign_digest(self._key.name, hashed)

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def decrypt(self, ciphertext: bytes, padding: padding.AsymmetricPadding) -> bytes:
        raise UnsupportedAlgorithmError("custos device keys are signing keys")

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        _refuse("private_numbers")

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        _refuse("private_bytes")

    def __copy__(self) -> DeviceRSAPrivateKey:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> DeviceRSAPrivateKey:
        return self


DevicePrivateKey = DeviceECPrivateKey | DeviceEd25519PrivateKey | DeviceRSAPrivateKey


def device_private_key(key: StoreKey) -> DevicePrivateKey:
    family = key.alg.spec.family
    if family == "ec":
        return DeviceECPrivateKey(key)
    if family == "ed25519":
        return DeviceEd25519PrivateKey(key)
    if family == "rsa":
        return DeviceRSAPrivateKey(key)
    raise UnsupportedAlgorithmError(f"no device key class for {key.alg.value}")


__all__ = [
    "Algorithm",
    "DeviceECPrivateKey",
    "DeviceEd25519PrivateKey",
    "DevicePrivateKey",
    "DeviceRSAPrivateKey",
    "device_private_key",
]
