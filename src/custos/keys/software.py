"""Software key stores: ``memory`` (held in this process, never exported) and
``exportable`` (the SPIFFE-compatible tier, where the workload receives its key).

They are separate classes on purpose: only :class:`ExportableKeyStore` has an
export call, so code that holds a ``KeyStore`` cannot reach key bytes by
accident.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric import utils as asym_utils
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

from custos._files import UnreadableFileError, read_small_file, read_small_text
from custos.keys.algorithms import Algorithm
from custos.keys.base import KeyInfo, KeyStore, check_key_name
from custos.keys.errors import (
    KeyExistsError,
    KeyFileError,
    KeyNotFoundError,
    KeyStoreError,
    StoreConfigError,
    UnsupportedAlgorithmError,
)
from custos.keys.signatures import der_to_raw

# A PKCS#8 PEM of an RSA-2048 key is under 2 KiB; an .alg file holds a JOSE name.
_MAX_PEM_BYTES = 64 * 1024
_MAX_ALG_BYTES = 64

SoftwareKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


def generate(alg: Algorithm) -> SoftwareKey:
    spec = alg.spec
    if spec.family == "ec":
        return ec.generate_private_key(spec.curve())
    if spec.family == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=spec.rsa_bits)


def algorithm_of(key: PrivateKeyTypes | PublicKeyTypes, *, pss: bool = False) -> Algorithm:
    """The JOSE algorithm a software key signs with (RSA: RS256 unless ``pss``)."""
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        if key.curve.name == "secp256r1":
            return Algorithm.ES256
        if key.curve.name == "secp384r1":
            return Algorithm.ES384
    elif isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return Algorithm.EdDSA
    elif isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return Algorithm.PS256 if pss else Algorithm.RS256
    raise UnsupportedAlgorithmError(
        f"custos does not sign with {type(key).__name__} keys"
        + (f" on curve {key.curve.name}" if isinstance(key, ec.EllipticCurvePrivateKey) else "")
    )


def _prehashed(alg: Algorithm) -> asym_utils.Prehashed:
    return asym_utils.Prehashed(alg.spec.hash_algorithm())


# What each algorithm's digest is signed with, built once rather than per signature
# (cryptography's parameter objects are immutable; ~3 µs a signature, issue 8 "Speed").
_ECDSA: dict[Algorithm, ec.ECDSA] = {
    alg: ec.ECDSA(_prehashed(alg)) for alg in Algorithm if alg.spec.family == "ec"
}
_RSA: dict[Algorithm, tuple[padding.AsymmetricPadding, asym_utils.Prehashed]] = {
    alg: (
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        if alg.spec.pss
        else padding.PKCS1v15(),
        _prehashed(alg),
    )
    for alg in Algorithm
    if alg.spec.family == "rsa"
}


def sign_digest_with(key: SoftwareKey, alg: Algorithm, hashed: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        der = key.sign(hashed, _ECDSA[alg])
        return der_to_raw(der, alg.spec.coordinate_size)
    if isinstance(key, rsa.RSAPrivateKey):
        pad, prehashed = _RSA[alg]
        return key.sign(hashed, pad, prehashed)
    raise UnsupportedAlgorithmError("EdDSA keys sign messages, not digests")


class _SoftwareKeyStore(KeyStore):
    """What both software tiers share: keys held as ``cryptography`` objects.

    A private base, so that neither tier is a subtype of the other: code that
    checks ``isinstance(store, MemoryKeyStore)`` to mean "never exported" must
    not be handed the exportable tier.
    """

    kind = "software"
    supported_algorithms = frozenset(Algorithm)
    persistent = False

    def __init__(self) -> None:
        self._keys: dict[str, tuple[Algorithm, SoftwareKey]] = {}
        self._lock = threading.Lock()

    def _create(self, name: str, alg: Algorithm) -> KeyInfo:
        key = generate(alg)
        with self._lock:
            if name in self._keys:
                raise KeyExistsError(f"key {name!r} already exists in the {self.kind} store")
            self._keys[name] = (alg, key)
        return KeyInfo(name, alg, self.kind)

    def _entry(self, name: str) -> tuple[Algorithm, SoftwareKey]:
        try:
            return self._keys[name]
        except KeyError:
            raise KeyNotFoundError(f"no key {name!r} in the {self.kind} store") from None

    def _info(self, name: str) -> KeyInfo:
        return KeyInfo(name, self._entry(name)[0], self.kind)

    def _list(self) -> list[KeyInfo]:
        with self._lock:
            return [KeyInfo(n, a, self.kind) for n, (a, _) in self._keys.items()]

    def _delete(self, name: str) -> None:
        with self._lock:
            if self._keys.pop(name, None) is None:
                raise KeyNotFoundError(f"no key {name!r} in the {self.kind} store")

    def _public_key(self, info: KeyInfo) -> PublicKeyTypes:
        return self._entry(info.name)[1].public_key()

    def _sign_digest(self, info: KeyInfo, hashed: bytes) -> bytes:
        return sign_digest_with(self._entry(info.name)[1], info.alg, hashed)

    def _sign_message(self, info: KeyInfo, data: bytes) -> bytes:
        key = self._entry(info.name)[1]
        assert isinstance(key, ed25519.Ed25519PrivateKey)
        return key.sign(data)

    def import_key(self, name: str, key: SoftwareKey, alg: Algorithm | None = None) -> KeyInfo:
        """Adopt an existing software key (tests, migrations)."""
        check_key_name(name)
        algorithm = alg or algorithm_of(key)
        with self._lock:
            if name in self._keys:
                raise KeyExistsError(f"key {name!r} already exists in the {self.kind} store")
            self._keys[name] = (algorithm, key)
        return KeyInfo(name, algorithm, self.kind)


class MemoryKeyStore(_SoftwareKeyStore):
    """Keys generated and held in this process; gone when it exits; never exported.

    The fast tier for services that sign a proof per request: an ECDSA
    signature costs tens of microseconds instead of a TPM round trip. A key
    adopted with :meth:`import_key` is never exported again either.
    """

    kind = "memory"


class ExportableKeyStore(_SoftwareKeyStore):
    """The SPIFFE-compatible tier: software keys the workload may receive.

    With a ``key_dir`` the keys are kept as mode-0600 PKCS#8 PEM files (so they
    survive a restart); without one they live in memory only.  The directory is
    made (mode 0700) when the first key is written, not when the store opens, so
    read-only use (``custos keys list``) never creates one.  Every file is read as
    a small regular file and checked completely (key type, ``.alg`` agreeing with
    the key) when the store opens: a bad file is a :class:`KeyFileError` naming it.
    """

    kind = "exportable"

    def __init__(self, key_dir: Path | str | None = None) -> None:
        super().__init__()
        self._dir = Path(key_dir) if key_dir is not None else None
        if self._dir is not None and "\0" in str(self._dir):
            raise StoreConfigError("the exportable key directory must not contain a NUL character")
        if self._dir is not None and self._dir.exists():
            if not self._dir.is_dir():
                raise StoreConfigError(
                    f"the exportable key directory {self._dir} is not a directory"
                )
            for path in sorted(self._dir.glob("*.pem")):
                self._load(path)

    @property
    def persistent(self) -> bool:  # type: ignore[override]
        return self._dir is not None

    def _path(self, name: str) -> Path:
        assert self._dir is not None
        return self._dir / f"{name}.pem"

    def _load(self, path: Path) -> None:
        name = path.stem
        alg_path = path.with_suffix(".alg")
        try:
            pem = read_small_file(path, max_bytes=_MAX_PEM_BYTES, what="exportable key file")
            alg_text = (
                read_small_text(alg_path, max_bytes=_MAX_ALG_BYTES, what="exportable key file")
                if os.path.lexists(alg_path)
                else None
            )
        except UnreadableFileError as e:
            raise KeyFileError(e.message) from e
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            # "from None": the parser's message may quote bytes of the key.
            raise KeyFileError(
                f"exportable key file {str(path)!r} is not an unencrypted PEM private key "
                "custos can use"
            ) from None
        try:
            check_key_name(name)
            implied = algorithm_of(key)
        except KeyStoreError as e:
            raise KeyFileError(f"exportable key file {str(path)!r}: {e.message}") from e
        try:
            alg = Algorithm.parse(alg_text.strip()) if alg_text is not None else implied
        except KeyStoreError as e:
            raise KeyFileError(f"exportable key file {str(alg_path)!r}: {e.message}") from e
        if algorithm_of(key, pss=alg is Algorithm.PS256) is not alg:
            raise KeyFileError(
                f"exportable key file {str(alg_path)!r} says {alg.value}, "
                f"but {path.name} holds a {implied.value} key"
            )
        assert isinstance(
            key, (ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, rsa.RSAPrivateKey)
        )
        self._keys[name] = (alg, key)

    def _create(self, name: str, alg: Algorithm) -> KeyInfo:
        info = super()._create(name, alg)
        if self._dir is not None:
            self._write(name, alg, self._keys[name][1])
        return info

    def _write(self, name: str, alg: Algorithm, key: SoftwareKey) -> None:
        assert self._dir is not None
        try:
            self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise StoreConfigError(
                f"cannot create the exportable key directory {self._dir}: "
                f"{e.strerror or type(e).__name__}"
            ) from e
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path = self._path(name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        path.with_suffix(".alg").write_text(alg.value)

    def _delete(self, name: str) -> None:
        super()._delete(name)
        if self._dir is not None:
            self._path(name).unlink(missing_ok=True)
            self._path(name).with_suffix(".alg").unlink(missing_ok=True)

    def export_private_key(self, name: str) -> SoftwareKey:
        """The private key itself. Only this tier has this call."""
        return self._entry(check_key_name(name))[1]

    def export_private_key_der(self, name: str) -> bytes:
        """PKCS#8 DER, as the SPIFFE Workload API's ``x509_svid_key`` carries it."""
        return self.export_private_key(name).private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
