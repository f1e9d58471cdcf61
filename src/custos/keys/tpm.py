"""TPM 2.0 key store (tpm2-pytss / ESAPI).

Keys
    Every key is an ordinary (non-restricted) signing key created under an ECC
    P-256 storage primary of the owner hierarchy, with attributes
    ``fixedTPM | fixedParent | sensitiveDataOrigin | userWithAuth | sign``: the TPM
    generated it, will never duplicate it and never lets the private part out in
    the clear.  The signing scheme is fixed in the key (ECDSA-SHA256/384,
    RSASSA- or RSAPSS-SHA256), so a PS256 key cannot be made to produce PKCS#1 v1.5
    signatures, and the algorithm can be read back from the public area alone.

Files
    ``<key_dir>/<name>.tss``: the key as a ``TSS2 PRIVATE KEY`` PEM (the format of
    tpm2-openssl, tpm2-tss-engine and ``tpm2_encodeobject``) with parent
    ``TPM2_RH_OWNER`` and empty auth.  Nothing else: the algorithm comes from the
    public area.  ``key_dir`` is created with mode 0700, blobs are written 0600.
    The private part in the blob is wrapped by the parent's seed: it is useless
    outside this TPM, but anybody who can read the blob and talk to this TPM can
    sign with it, so the directory is private.

The parent
    :data:`PARENT_TEMPLATE` is the standard ECC parent of tpm2-openssl and
    ``tpm2_pytss.tsskey.TSSPrivKey`` (restricted decrypt, AES-128-CFB, P-256,
    noDA, empty unique).  A primary is a deterministic function of the owner seed
    and its template, so every process that creates it gets the same key, and
    tpm2-openssl loads our blobs by recreating it the same way.

Threads and handles
    ESAPI contexts are not thread-safe: one worker thread owns the one context and
    every TPM call runs there; public methods may be called from any thread.
    The primary is created once per connection and kept loaded (measured on
    swtpm: creating it costs about 2.7 ms while load + sign + flush of a key
    costs about 3 ms, so re-creating it per signature would nearly double the
    latency).  It occupies one of swtpm's three object slots; each signature loads
    its key and flushes it in a ``finally``, on errors too.  swtpm has no resource
    manager, so other clients of the same swtpm share the remaining slots; in
    production ``/dev/tpmrm0`` virtualises them.

Connection and device loss
    The constructor connects eagerly (and creates the primary), so a wrong TCTI or
    an absent TPM is reported at start-up as :class:`DeviceUnavailableError`.  Any
    TCTI or I/O failure later raises :class:`DeviceUnavailableError` too; the
    context is dropped and the next call reconnects (new TCTI, new ESAPI context,
    new primary) by itself.  Nothing is lost: the keys are the blobs on disk.  If
    the TPM restarted between two calls without an I/O error being seen (swtpm's
    TCTI opens a connection per command), the cached primary handle is stale: a
    failed load re-reads the primary's name and, if it no longer matches, creates
    the primary again and retries once.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_ECC,
    TPM2_RC,
    TPM2_RH,
    TPM2_ST,
    TPMA_OBJECT,
    TSS2_RC,
)
from tpm2_pytss.tsskey import TSSPrivKey
from tpm2_pytss.types import (
    TPM2B_DIGEST,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMS_ECC_PARMS,
    TPMS_RSA_PARMS,
    TPMS_SCHEME_HASH,
    TPMT_ECC_SCHEME,
    TPMT_KDF_SCHEME,
    TPMT_PUBLIC,
    TPMT_RSA_SCHEME,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF_OBJECT,
    TPMT_TK_HASHCHECK,
    TPMU_ASYM_SCHEME,
    TPMU_PUBLIC_PARMS,
    TPMU_SIG_SCHEME,
    TPMU_SYM_KEY_BITS,
    TPMU_SYM_MODE,
)

from custos.keys.algorithms import Algorithm
from custos.keys.base import KeyInfo, KeyStore, check_key_name
from custos.keys.config import DEFAULT_KEY_DIR, DEFAULT_TCTI
from custos.keys.errors import (
    DeviceUnavailableError,
    KeyExistsError,
    KeyNotFoundError,
    KeyStoreError,
    StoreConfigError,
    UnsupportedAlgorithmError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

SUFFIX = ".tss"

#: The attributes every custos TPM key has, and must have when loaded from disk.
KEY_ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.SIGN_ENCRYPT
)

#: Attributes a key must not have: restricted signing keys only sign TPM-made
#: data, and a key that also decrypts mixes two uses of one secret.
_FORBIDDEN_ATTRIBUTES = TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT

#: The storage primary our keys live under: tpm2-openssl's (and TSSPrivKey's) ECC
#: parent template, so a "TSS2 PRIVATE KEY" with parent TPM2_RH_OWNER means the
#: same key to them and to us.
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

_HASH = {"sha256": TPM2_ALG.SHA256, "sha384": TPM2_ALG.SHA384}
_CURVE = {"P-256": TPM2_ECC.NIST_P256, "P-384": TPM2_ECC.NIST_P384}

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
_UNSUPPORTED_RCS = {
    TPM2_RC.CURVE, TPM2_RC.KEY_SIZE, TPM2_RC.SCHEME, TPM2_RC.ASYMMETRIC, TPM2_RC.HASH,
}


class TpmError(KeyStoreError):
    """The TPM answered, and refused (a TPM_RC other than a transport failure)."""

    code = "tpm_error"


class BadKeyBlobError(KeyStoreError):
    """A key file is not a key this store can use (corrupt, wrong type, wrong parent)."""

    code = "bad_key_file"


def _layer(rc: int) -> int:
    return rc & int(TSS2_RC.RC_LAYER_MASK)


def is_device_loss(e: TSS2_Exception) -> bool:
    layer = _layer(e.rc)
    if layer == TSS2_RC.TCTI_RC_LAYER:
        return (e.rc & _BASE_MASK) not in (
            TSS2_RC.BASE_RC_BAD_VALUE, TSS2_RC.BASE_RC_NOT_SUPPORTED,
        )
    if layer in (TSS2_RC.ESAPI_RC_LAYER, TSS2_RC.SYS_RC_LAYER):
        return (e.rc & _BASE_MASK) in _LOSS_BASES
    return False


def _tpm_rc(e: TSS2_Exception) -> int:
    """The TPM error with handle/parameter/session numbers stripped (0 if not a TPM rc)."""
    return int(e.error) if _layer(e.rc) == TSS2_RC.TPM_RC_LAYER else 0


def key_template(alg: Algorithm) -> TPMT_PUBLIC:
    """The public template of a new signing key for ``alg`` (scheme fixed in the key)."""
    spec = alg.spec
    if spec.family == "ec" and spec.hash_name and spec.curve_name:
        params = TPMU_PUBLIC_PARMS(
            eccDetail=TPMS_ECC_PARMS(
                symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
                scheme=TPMT_ECC_SCHEME(
                    scheme=TPM2_ALG.ECDSA,
                    details=TPMU_ASYM_SCHEME(ecdsa=TPMS_SCHEME_HASH(hashAlg=_HASH[spec.hash_name])),
                ),
                curveID=_CURVE[spec.curve_name],
                kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
            )
        )
        kind = TPM2_ALG.ECC
    elif spec.family == "rsa" and spec.hash_name:
        scheme = TPM2_ALG.RSAPSS if spec.pss else TPM2_ALG.RSASSA
        details = TPMU_ASYM_SCHEME(anySig=TPMS_SCHEME_HASH(hashAlg=_HASH[spec.hash_name]))
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
        objectAttributes=KEY_ATTRIBUTES,
        authPolicy=b"",
        parameters=params,
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


def _sig_scheme(alg: Algorithm) -> Any:
    spec = alg.spec
    assert spec.hash_name is not None
    kind = TPM2_ALG.ECDSA if spec.family == "ec" else (
        TPM2_ALG.RSAPSS if spec.pss else TPM2_ALG.RSASSA
    )
    return TPMT_SIG_SCHEME(
        scheme=kind,
        details=TPMU_SIG_SCHEME(any=TPMS_SCHEME_HASH(hashAlg=_HASH[spec.hash_name])),
    )


def _jose_signature(alg: Algorithm, sig: Any) -> bytes:
    """TPMT_SIGNATURE -> JOSE form (ECDSA: fixed-width r||s; RSA: the signature bytes)."""
    spec = alg.spec
    if spec.family == "ec":
        # The TPM may return r or s shorter than the coordinate size (leading zeros).
        size = spec.coordinate_size
        r = bytes(sig.signature.ecdsa.signatureR)
        s = bytes(sig.signature.ecdsa.signatureS)
        return r.rjust(size, b"\0") + s.rjust(size, b"\0")
    rsa_sig = sig.signature.rsapss if spec.pss else sig.signature.rsassa
    return bytes(rsa_sig.sig)


@dataclass(frozen=True)
class _Entry:
    """A parsed key blob and what we derived from it; ``stamp`` detects file changes."""

    stamp: tuple[int, int, int]
    alg: Algorithm
    tss: Any  # TSSPrivKey
    public_key: PublicKeyTypes
    attributes: TPMA_OBJECT


# ---- the worker thread that owns the ESAPI context --------------------------


class _Job(Generic[T]):
    def __init__(self, fn: Callable[[], T]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.result: T | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as e:  # noqa: BLE001 - handed to the calling thread
            self.error = e
        finally:
            self.done.set()

    def wait(self) -> T:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]


class _TpmWorker:
    """One thread, one ESAPI context, one cached primary.

    A plain daemon thread rather than a ThreadPoolExecutor: executors refuse work
    once interpreter shutdown begins, and the finalizer that flushes our primary
    must still be able to run then.
    """

    def __init__(self, tcti: str) -> None:
        self.tcti = tcti
        self._queue: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="custos-tpm", daemon=True)
        self._closed = False
        self._lock = threading.Lock()
        # Touched only on the worker thread:
        self._ectx: Any = None  # ESAPI
        self._primary: Any = None  # ESYS_TR
        self._primary_name: bytes = b""
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            job.run()

    def call(self, fn: Callable[[], T]) -> T:
        if threading.current_thread() is self._thread:
            return fn()
        with self._lock:
            if self._closed:
                raise KeyStoreError("the tpm key store is closed", code="store_closed")
            job: _Job[T] = _Job(fn)
            self._queue.put(job)
        return job.wait()

    def shutdown(self) -> None:
        """Flush the primary, finalize ESAPI, end the thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            if self._thread.is_alive():
                job: _Job[None] = _Job(self._disconnect)
                self._queue.put(job)
                self._queue.put(None)
            self._closed = True
        if threading.current_thread() is not self._thread and self._thread.is_alive():
            job.done.wait(10.0)
            self._thread.join(10.0)

    # -- below: worker thread only --

    def _connect(self) -> None:
        try:
            ectx = ESAPI(self.tcti)
        except TSS2_Exception as e:
            if is_device_loss(e):
                raise DeviceUnavailableError(
                    f"cannot reach the TPM at {self.tcti!r} ({e}): is the device present "
                    "(/dev/tpmrm0) or the simulator running?"
                ) from e
            raise StoreConfigError(f"invalid TPM TCTI {self.tcti!r}: {e}") from e
        self._ectx = ectx
        try:
            self._create_primary()
        except BaseException:
            self._drop()
            raise

    def _create_primary(self) -> None:
        try:
            primary, public, *_ = self._ectx.create_primary(
                TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=PARENT_TEMPLATE), ESYS_TR.OWNER
            )
        except TSS2_Exception as e:
            if is_device_loss(e):
                raise
            raise TpmError(
                f"the TPM at {self.tcti!r} refused to create the storage primary ({e}); "
                "is the owner hierarchy protected by a password, or are all object slots "
                "in use (a simulator without resource manager)?"
            ) from e
        self._primary = primary
        self._primary_name = bytes(public.get_name())

    def _primary_is_ours(self) -> bool:
        try:
            _, name, _ = self._ectx.read_public(self._primary)
        except TSS2_Exception as e:
            if is_device_loss(e):
                raise
            return False
        return bytes(name) == self._primary_name

    def _forget_primary(self) -> None:
        # The TPM lost the object (restart): only ESAPI's local record is left.
        if self._primary is not None:
            try:
                self._ectx.tr_close(self._primary)
            except TSS2_Exception:
                log.debug("tr_close of a stale primary failed", exc_info=True)
        self._primary = None
        self._create_primary()

    def _drop(self) -> None:
        ectx, self._ectx, self._primary = self._ectx, None, None
        if ectx is not None:
            try:
                ectx.close()
            except Exception:
                log.debug("closing a broken ESAPI context failed", exc_info=True)

    def _disconnect(self) -> None:
        if self._ectx is not None and self._primary is not None:
            try:
                self._ectx.flush_context(self._primary)
            except TSS2_Exception:
                log.debug("flushing the primary at close failed", exc_info=True)
        self._drop()

    def device(self, op: Callable[[Any, Any], T]) -> T:
        """Run ``op(ectx, primary)`` on the worker; connect first; translate device loss."""

        def run() -> T:
            if self._ectx is None:
                self._connect()
            try:
                return op(self._ectx, self._primary)
            except TSS2_Exception as e:
                if is_device_loss(e):
                    self._drop()
                    raise DeviceUnavailableError(
                        f"lost the TPM at {self.tcti!r} ({e}); the store reconnects by "
                        "itself once the device is back, and no key is lost"
                    ) from e
                raise TpmError(f"TPM error: {e}") from e

        return self.call(run)

    def load(self, ectx: Any, tss: Any) -> Any:
        """Load a key under the cached primary, re-creating a stale primary once."""
        try:
            return ectx.load(self._primary, tss.private, tss.public)
        except TSS2_Exception as e:
            if is_device_loss(e) or self._primary_is_ours():
                raise
            log.info("the TPM no longer holds our primary (restarted?); re-creating it")
        self._forget_primary()
        return ectx.load(self._primary, tss.private, tss.public)

    def create(self, ectx: Any, template: TPMT_PUBLIC) -> tuple[Any, Any]:
        def attempt() -> tuple[Any, Any]:
            private, public, *_ = ectx.create(
                self._primary, TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=template)
            )
            return private, public

        try:
            return attempt()
        except TSS2_Exception as e:
            if is_device_loss(e) or self._primary_is_ours():
                raise
        self._forget_primary()
        return attempt()


# ---- the store --------------------------------------------------------------


class TpmKeyStore(KeyStore):
    """Named signing keys in a TPM 2.0, kept as ``TSS2 PRIVATE KEY`` blobs in ``key_dir``."""

    kind = "tpm"
    supported_algorithms: ClassVar[frozenset[Algorithm]] = frozenset(
        {Algorithm.ES256, Algorithm.ES384, Algorithm.RS256, Algorithm.PS256}
    )

    def __init__(self, tcti: str = DEFAULT_TCTI, key_dir: Path | str = DEFAULT_KEY_DIR) -> None:
        self.tcti = tcti
        self.key_dir = Path(key_dir)
        try:
            self.key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise StoreConfigError(
                f"cannot create the TPM key directory {self.key_dir}: {e}"
            ) from e
        self._cache: dict[str, _Entry] = {}
        self._cache_lock = threading.Lock()
        self._worker = _TpmWorker(tcti)
        # Flush our primary even if nobody calls close(): on swtpm (no resource
        # manager) a leaked transient holds one of three object slots until restart.
        self._finalizer = weakref.finalize(self, self._worker.shutdown)
        try:
            self._worker.device(lambda ectx, primary: None)  # eager: fail at start-up
        except BaseException:
            self.close()
            raise

    # -- files --

    def _path(self, name: str) -> Path:
        return self.key_dir / f"{name}{SUFFIX}"

    def _entry(self, name: str) -> _Entry:
        path = self._path(name)
        try:
            st = path.stat()
        except FileNotFoundError:
            with self._cache_lock:
                self._cache.pop(name, None)
            raise KeyNotFoundError(f"no key {name!r} in the {self.kind} store") from None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._cache.get(name)
        if cached is not None and cached.stamp == stamp:
            return cached
        entry = self._parse(name, path.read_bytes(), stamp)
        with self._cache_lock:
            self._cache[name] = entry
        return entry

    def _parse(self, name: str, pem: bytes, stamp: tuple[int, int, int]) -> _Entry:
        try:
            tss = TSSPrivKey.from_pem(pem)
            public = tss.public.publicArea
            public_key = serialization.load_der_public_key(tss.public.to_der())
        except Exception as e:
            raise BadKeyBlobError(f"key file for {name!r} is not a valid TSS2 PRIVATE KEY") from e
        if tss.parent != TPM2_RH.OWNER or not tss.empty_auth:
            raise BadKeyBlobError(
                f"key {name!r} has parent {tss.parent:#x} / auth; this store only uses keys "
                "under the owner-hierarchy primary with empty auth"
            )
        attributes = TPMA_OBJECT(public.objectAttributes)
        # Custody check: a planted or imported key that the TPM could duplicate (no
        # fixedTPM / fixedParent), or whose secret came from outside
        # (no sensitiveDataOrigin), is not a device-held key; refuse to sign with it.
        missing = KEY_ATTRIBUTES & ~attributes
        extra = attributes & _FORBIDDEN_ATTRIBUTES
        if missing or extra:
            raise BadKeyBlobError(
                f"key {name!r} is not a non-duplicable TPM-generated signing key "
                f"(attributes {attributes!s}; missing {TPMA_OBJECT(missing)!s}, "
                f"forbidden {TPMA_OBJECT(extra)!s})"
            )
        return _Entry(stamp, algorithm_of(public), tss, public_key, attributes)

    # -- KeyStore primitives --

    def _create(self, name: str, alg: Algorithm) -> KeyInfo:
        path = self._path(name)
        if path.exists():
            raise KeyExistsError(f"key {name!r} already exists in the {self.kind} store")
        template = key_template(alg)

        def op(ectx: Any, primary: Any) -> tuple[Any, Any]:
            return self._worker.create(ectx, template)

        try:
            private, public = self._worker.device(op)
        except TpmError as e:
            cause = e.__cause__
            if isinstance(cause, TSS2_Exception) and _tpm_rc(cause) in _UNSUPPORTED_RCS:
                raise UnsupportedAlgorithmError(
                    f"this TPM cannot create {alg.value} keys ({cause})"
                ) from cause
            raise
        pem = TSSPrivKey(private, public, empty_auth=True, parent=TPM2_RH.OWNER).to_pem()
        self._write_exclusive(name, pem)
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
        return KeyInfo(name, self._entry(name).alg, self.kind)

    def _list(self) -> list[KeyInfo]:
        out = []
        for path in self.key_dir.glob(f"*{SUFFIX}"):
            name = path.name[: -len(SUFFIX)]
            try:
                out.append(self._info(check_key_name(name)))
            except KeyNotFoundError:
                continue  # deleted while we listed
            except KeyStoreError as e:
                # One bad file must not hide the others; say so in the log.
                log.warning("skipping TPM key file %s: %s", path, e)
        return out

    def _delete(self, name: str) -> None:
        with self._cache_lock:
            self._cache.pop(name, None)
        try:
            self._path(name).unlink()
        except FileNotFoundError:
            raise KeyNotFoundError(f"no key {name!r} in the {self.kind} store") from None

    def _public_key(self, info: KeyInfo) -> PublicKeyTypes:
        return self._entry(info.name).public_key

    def _sign_digest(self, info: KeyInfo, hashed: bytes) -> bytes:
        entry = self._entry(info.name)
        alg = entry.alg
        scheme = _sig_scheme(alg)
        worker = self._worker

        def op(ectx: Any, primary: Any) -> Any:
            try:
                handle = worker.load(ectx, entry.tss)
            except TSS2_Exception as e:
                if is_device_loss(e):
                    raise
                raise TpmError(
                    f"the TPM refused to load key {info.name!r} ({e}): the blob is corrupt "
                    "or was made by another TPM or under another owner seed"
                ) from e
            try:
                return ectx.sign(
                    handle,
                    TPM2B_DIGEST(hashed),
                    scheme,
                    TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL),
                )
            finally:
                # Always: swtpm has three object slots and no resource manager.
                ectx.flush_context(handle)

        return _jose_signature(alg, worker.device(op))

    # -- extras for tests and operators --

    def key_attributes(self, name: str) -> TPMA_OBJECT:
        """The TPMA_OBJECT attributes recorded in the key's public area (no TPM call)."""
        return self._entry(check_key_name(name)).attributes

    def key_path(self, name: str) -> Path:
        """Where the key's ``TSS2 PRIVATE KEY`` blob lives."""
        return self._path(check_key_name(name))

    def close(self) -> None:
        self._finalizer()
