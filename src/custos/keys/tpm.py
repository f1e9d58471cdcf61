"""TPM 2.0 key store: named workload signing keys, a thin :class:`KeyStore` over
:mod:`custos.tpm`.

Keys
    Every key is an ordinary (non-restricted) signing key created under the ECC
    P-256 storage primary of the owner hierarchy, with attributes
    ``fixedTPM | fixedParent | sensitiveDataOrigin | userWithAuth | sign``: the TPM
    generated it, will never duplicate it and never lets the private part out in
    the clear (:data:`custos.tpm.templates.KEY_ATTRIBUTES`).  The store refuses
    restricted keys (attestation keys: :mod:`custos.tpm.ak`), decrypt keys and
    duplicable or imported keys.

Files
    ``<key_dir>/<name>.tss``: the key as a ``TSS2 PRIVATE KEY`` PEM with parent
    ``TPM2_RH_OWNER`` and empty auth (:mod:`custos.tpm.blobs`).  ``key_dir`` is
    created with mode 0700, blobs are written 0600.  A key file is read as a small
    regular file and validated completely before anything of it reaches the TPM.

Checked against the device (issue 7 item 10)
    The first time a key file is looked up (info, public_key, get, sign, list),
    and again whenever its (inode, mtime, size) stamp changes, the TPM loads it
    and the name it computes must be the name of the file's public area
    (:meth:`custos.tpm.context.TpmContext.verify`): a file whose public area was
    swapped for another key's is refused (``bad_key_file``), never reported or
    exported as ours.  The key then stays loaded, so the check costs the first
    signature nothing and later ones a dict look-up.

Context, loaded keys, device loss
    Shared per TCTI per process: :mod:`custos.tpm.context`.  ``loaded_key_cache``
    (default 1) keys stay loaded between signatures; every signature stats the
    key's file, so a changed or removed blob is flushed before it could sign.
    The constructor connects eagerly, so a wrong TCTI or an absent TPM is reported
    at start-up as :class:`DeviceUnavailableError`; later transport failures raise
    it too and the next call reconnects.  See docs/decisions/0009-tpm-speed.md and
    0010-tpm-no-resource-manager.md for the measurements and the trade-offs of
    keeping keys loaded on a TPM without resource manager.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NoReturn

from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from tpm2_pytss import TSS2_Exception
from tpm2_pytss.constants import TPMA_OBJECT

from custos.keys.algorithms import Algorithm
from custos.keys.base import KeyInfo, KeyStore, check_key_name
from custos.keys.errors import (
    DeviceUnavailableError,
    KeyExistsError,
    KeyNotFoundError,
    KeyStoreError,
    StoreClosedError,
    StoreConfigError,
    UnsupportedAlgorithmError,
)
from custos.tpm.blobs import KeyBlob, Stamp, read_key_file, serialize_key_blob, signing_key_blob
from custos.tpm.context import attach, detach
from custos.tpm.errors import (
    UNSUPPORTED_RCS,
    BadKeyBlobError,
    TpmError,
    TpmSlotsExhaustedError,
    is_device_loss,
    tpm_rc,
)
from custos.tpm.signatures import jose_signature
from custos.tpm.tcti import resolve_tcti
from custos.tpm.templates import KEY_ATTRIBUTES, PARENT_TEMPLATE, algorithm_of, key_template

log = logging.getLogger(__name__)

SUFFIX = ".tss"

#: Where key blobs live by default; the same path as ``custos.keys.config.DEFAULT_KEY_DIR``
#: (not imported from there: the config module imports the backends, not the reverse).
DEFAULT_KEY_DIR = Path("/var/lib/custos/keys")


@dataclass(frozen=True)
class _Entry:
    """A key file as read, validated and checked against the TPM; ``stamp`` detects changes."""

    stamp: Stamp
    blob: KeyBlob


# ---- the store --------------------------------------------------------------


class TpmKeyStore(KeyStore):
    """Named signing keys in a TPM 2.0, kept as ``TSS2 PRIVATE KEY`` blobs in ``key_dir``."""

    kind = "tpm"
    supported_algorithms: ClassVar[frozenset[Algorithm]] = frozenset(
        {Algorithm.ES256, Algorithm.ES384, Algorithm.RS256, Algorithm.PS256}
    )

    def __init__(
        self,
        tcti: str | None = None,
        key_dir: Path | str = DEFAULT_KEY_DIR,
        *,
        loaded_key_cache: int = 1,
    ) -> None:
        if isinstance(loaded_key_cache, bool) or not isinstance(loaded_key_cache, int) or (
            loaded_key_cache < 0
        ):
            raise StoreConfigError("loaded_key_cache is a number of keys, 0 or more")
        #: explicit, else CUSTOS_TCTI / TPM2TOOLS_TCTI / TSS2_TCTI, else the default
        self.tcti = tcti = resolve_tcti(tcti)
        self.key_dir = Path(key_dir)
        self._key_dir_str = str(self.key_dir)
        try:
            self.key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise StoreConfigError(
                f"cannot create the TPM key directory {self.key_dir}: {e}"
            ) from e
        self._cache: dict[str, _Entry] = {}
        self._cache_lock = threading.Lock()
        self._capacity = loaded_key_cache
        self._keep = loaded_key_cache > 0
        self._closed = False
        # Shared with the other stores of this process on the same TCTI string.
        self._tpm, token = attach(tcti, loaded_key_cache)
        # Let go of the context even if nobody calls close(): on swtpm (no resource
        # manager) a leaked transient holds one of three object slots until restart.
        self._finalizer = weakref.finalize(self, detach, self._tpm, token, self._key_dir_str)
        try:
            self._tpm.device(lambda ectx: None)  # eager: fail at start-up
        except BaseException:
            self.close()
            raise

    @property
    def loaded_key_cache(self) -> int:
        """How many signing keys stay loaded in the TPM between signatures.

        Stores of one process on one TCTI share one cache, of the largest size any
        of them asked for; a store that asked for 0 never leaves its keys loaded.
        """
        return self._capacity

    @property
    def device_id(self) -> tuple[str, str]:
        # Stores on one TCTI share one TPM (and one context): the async facade queues on it.
        return ("tpm", self.tcti)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("the tpm key store is closed")

    # -- files --

    def _path(self, name: str) -> Path:
        return self.key_dir / f"{name}{SUFFIX}"

    def _entry(self, name: str) -> _Entry:
        """The key file of ``name``, validated and checked against the TPM once per stamp."""
        # A str path and os.stat: pathlib costs ~5 µs more, and this runs per signature.
        path = os.path.join(self._key_dir_str, name + SUFFIX)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._gone(name)
        except OSError as e:
            raise BadKeyBlobError(f"cannot read key file {name!r}: {e.strerror or e}") from e
        cached = self._cache.get(name)
        if cached is not None and cached.stamp == (st.st_ino, st.st_mtime_ns, st.st_size):
            return cached
        with self._cache_lock:
            self._cache.pop(name, None)  # never serve an older file's entry again
        what = f"key file for {name!r}"
        try:
            stamp, data = read_key_file(path, what=what)
        except FileNotFoundError:  # deleted between stat and open
            self._gone(name)
        except OSError as e:  # no permission, an I/O error
            raise BadKeyBlobError(f"cannot read {what}: {e.strerror or e}") from e
        blob = signing_key_blob(data, what=what)
        tpm = self._tpm
        key = (self._key_dir_str, name)
        tpm.device(lambda ectx: tpm.verify(key, stamp, blob, self._keep))
        entry = _Entry(stamp, blob)
        with self._cache_lock:
            self._cache[name] = entry
        return entry

    def _gone(self, name: str) -> NoReturn:
        with self._cache_lock:
            self._cache.pop(name, None)
        self._evict(name)  # deleted behind our back: never sign with it again
        raise KeyNotFoundError(f"no key {name!r} in the {self.kind} store") from None

    # -- KeyStore primitives --

    def _create(self, name: str, alg: Algorithm) -> KeyInfo:
        path = self._path(name)
        if path.exists():
            raise KeyExistsError(f"key {name!r} already exists in the {self.kind} store")
        template = key_template(alg)
        self._check_open()
        try:
            private, public = self._tpm.device(lambda ectx: self._tpm.create(template))
        except TpmError as e:
            cause = e.__cause__
            if isinstance(cause, TSS2_Exception) and tpm_rc(cause) in UNSUPPORTED_RCS:
                raise UnsupportedAlgorithmError(
                    f"this TPM cannot create {alg.value} keys ({cause})"
                ) from cause
            raise
        self._write_exclusive(name, serialize_key_blob(private, public))
        return KeyInfo(name, alg, self.kind)

    def _write_exclusive(self, name: str, pem: bytes) -> None:
        # Write a temp file, then link(2) it into place: the blob appears complete or
        # not at all, and link fails if another process took the name meanwhile.
        path = self._path(name)
        tmp = self.key_dir / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise KeyExistsError(
                    f"key {name!r} already exists in the {self.kind} store"
                ) from None
        finally:
            tmp.unlink(missing_ok=True)

    def _info(self, name: str) -> KeyInfo:
        return KeyInfo(name, self._entry(name).blob.alg, self.kind)

    def _list(self) -> list[KeyInfo]:
        out = []
        for path in self.key_dir.glob(f"*{SUFFIX}"):
            name = path.name[: -len(SUFFIX)]
            try:
                out.append(self._info(check_key_name(name)))
            except KeyNotFoundError:
                continue  # deleted while we listed
            except DeviceUnavailableError:
                raise  # a lost TPM is not a bad file: an empty listing would hide it
            except KeyStoreError as e:
                # One bad file must not hide the others; say so in the log.
                log.warning("skipping TPM key file %s: %s", path, e)
        return out

    def _delete(self, name: str) -> None:
        # Under the context lock, file first: a signature either ran before (and its
        # key is flushed here) or runs after and finds no file (_sign_digest checks
        # under the same lock), so no signature can load the key again in between.
        with self._tpm.lock:
            with self._cache_lock:
                self._cache.pop(name, None)
            try:
                self._path(name).unlink()
            except FileNotFoundError:
                raise KeyNotFoundError(f"no key {name!r} in the {self.kind} store") from None
            finally:
                self._evict(name)

    def _public_key(self, info: KeyInfo) -> PublicKeyTypes:
        return self._entry(info.name).blob.public_key

    def _evict(self, name: str) -> None:
        """Flush ``name``'s loaded key, if any (best effort: the file is what counts)."""
        tpm = self._tpm
        key = (self._key_dir_str, name)
        with tpm.lock:  # reentrant: device() below takes it again
            if tpm.closed or not tpm.is_loaded(key):
                return  # in particular: never connect just to flush nothing
            try:
                tpm.device(lambda ectx: tpm.evict(key))
            except KeyStoreError as e:
                # Device gone: dropping the context already forgot every loaded key.
                log.debug("flushing the loaded key %r failed: %s", name, e)

    def _sign_digest(self, info: KeyInfo, hashed: bytes) -> bytes:
        tpm = self._tpm
        name = info.name
        key = (self._key_dir_str, name)
        keep = self._keep

        def op(ectx: Any) -> Any:
            self._check_open()
            # Read (stat) under the context lock, as _delete unlinks under it: the key
            # cannot be deleted between this check and its load.
            entry = self._entry(name)
            if entry.blob.alg is not info.alg:
                raise KeyStoreError(f"key {name!r} changed while signing; try again")
            return tpm.sign(key, entry.stamp, entry.blob, hashed, keep)

        return jose_signature(info.alg, tpm.device(op))

    # -- extras for tests and operators --

    def key_attributes(self, name: str) -> TPMA_OBJECT:
        """The TPMA_OBJECT attributes recorded in the key's public area (no TPM call)."""
        return self._entry(check_key_name(name)).blob.attributes

    def key_path(self, name: str) -> Path:
        """Where the key's ``TSS2 PRIVATE KEY`` blob lives."""
        return self._path(check_key_name(name))

    def close(self) -> None:
        self._closed = True
        self._finalizer()


# Re-exported: the names this module had before the public TPM layer existed.
__all__ = [
    "DEFAULT_KEY_DIR",
    "KEY_ATTRIBUTES",
    "PARENT_TEMPLATE",
    "SUFFIX",
    "BadKeyBlobError",
    "TpmError",
    "TpmKeyStore",
    "TpmSlotsExhaustedError",
    "algorithm_of",
    "is_device_loss",
    "key_template",
]
