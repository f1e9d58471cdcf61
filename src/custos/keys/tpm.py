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
    ESAPI contexts are not thread-safe: the store's one context is used under one
    lock, on the calling thread (see :class:`_TpmContext` for why serial use from
    several threads is sound; handing each call to a dedicated worker thread cost
    ~100-115 µs).
    The primary is created once per connection and kept loaded (measured on
    swtpm: creating it costs about 2.7 ms, a whole signature about 0.9 ms).

One context per TCTI per process
    Every :class:`TpmKeyStore` of a process opened on the same TCTI string shares
    one context: one ESAPI connection, one primary, one loaded-key cache (sized
    to the largest ``loaded_key_cache`` asked for), reference-counted and closed
    with the last store.  So ``custos dev`` (server and agent in one process on
    one swtpm) takes two object slots, not four.  A store's ``close()`` flushes
    the keys it loaded; the primary goes with the last store.  Two *processes*
    cannot share a TPM without resource manager reliably: see
    docs/decisions/0010-tpm-no-resource-manager.md.

Loaded keys (``loaded_key_cache``, default 1)
    The last ``loaded_key_cache`` keys used stay loaded between signatures (an
    LRU); 0 loads and flushes the key around every signature.  Measured on swtpm:
    TPM2_Load + TPM2_FlushContext cost about 1.2 ms on top of a 0.7-0.9 ms
    TPM2_Sign, so keeping the key loaded is what brings a signature near the raw
    device call (measured: 1.06-1.15x a raw ESAPI ``sign`` on a loaded key, was
    2.6-3.1x with load + sign + flush and the worker thread).  Every object
    counts against swtpm's three slots (no resource manager; the primary takes
    one), so the default is one key:

    * evicted keys are flushed before another is loaded;
    * every signature stats the key's file: a changed blob is flushed and loaded
      again from the new file, a file removed behind the store's back is flushed
      at the next call naming the key (which then fails ``key_not_found``), and
      :meth:`delete` flushes at once, so no signature is ever made with a key
      whose file is gone or replaced;
    * a key whose signature fails is flushed, not kept;
    * ``TPM_RC_OBJECT_MEMORY`` on load, create or create-primary (another client
      of a TPM without resource manager holds the slots): our loaded keys are
      flushed and the command retried once; still full, or nothing of ours to
      flush: :class:`TpmSlotsExhaustedError`, which says that only one process
      may use such a TPM at a time and to use ``/dev/tpmrm0`` or tpm2-abrmd;
    * a loaded key that stops signing (the TPM restarted, or another client
      flushed it) is forgotten with every other loaded key, and the signature is
      retried once from a fresh load, which also re-checks the primary.  If the
      TPM's reset/restart counters moved (it started up again), the old handles
      are only closed in ESAPI, not flushed: those numbers may now be another
      client's objects;
    * :meth:`delete` unlinks the file and flushes the key under the context
      lock, and a signature checks the file under that lock, so a signature
      racing a delete cannot load the key again after it;
    * ``close()``, the finalizer and device loss flush or forget everything.

    Trade-off, stated: on a TPM *without* resource manager (``/dev/tpm0``, a bare
    swtpm) transient handles are global, so while a key stays loaded any other
    client of that TPM can sign with it (empty auth) without reading its blob -
    with load-per-signature that window was one signature long.  Behind
    ``/dev/tpmrm0`` (production) each connection sees only its own objects.  Use
    ``loaded_key_cache=0`` on a TPM shared raw with clients you do not trust; and
    on swtpm other clients (the CLI next to a running agent) find one slot fewer.
    Also only without resource manager: if the TPM restarts unseen and another
    client loads an object at the very handle number of our loaded key before our
    next signature, TPM2_Sign (password session: ESAPI checks no object name)
    signs with that object; the result does not verify under our key and
    nothing of ours is exposed.

Connection and device loss
    The constructor connects eagerly (and creates the primary), so a wrong TCTI or
    an absent TPM is reported at start-up as :class:`DeviceUnavailableError`.  Any
    TCTI or I/O failure later raises :class:`DeviceUnavailableError` too; the
    context is dropped and the next call reconnects (new TCTI, new ESAPI context,
    new primary) by itself.  Nothing is lost: the keys are the blobs on disk.
    A transport error does not prove the TPM went away (one failed connection to a
    swtpm that is still up), and without resource manager our primary and loaded
    keys would then hold their slots for good.  So the handle numbers and names
    of what we had loaded are kept; on reconnecting (or at ``close()``), each one
    the TPM still holds under the same name is flushed, provided the TPM's
    reset/restart counters have not moved since (else it is gone, and the handle
    may be someone else's).  If the primary cannot be created again (slots
    full, owner password set) the context stays without one and the next call
    tries again; every failure is a custos error.  If
    the TPM restarted between two calls without an I/O error being seen (swtpm's
    TCTI opens a connection per command), the cached handles are stale: a failed
    signature with a loaded key forgets the loaded keys, and a failed load
    re-reads the primary's name and, if it no longer matches, creates the primary
    again and retries once.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NoReturn, TypeVar

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


# Built once: constructing a TPMT_SIG_SCHEME through tpm2-pytss costs ~30 µs and the
# NULL ticket ~8 µs (measured), against a ~700-900 µs TPM2_Sign on swtpm. ESAPI only
# reads them (const inputs), and every use is under the context lock.
_SCHEMES: dict[Algorithm, Any] = {alg: _sig_scheme(alg) for alg in (
    Algorithm.ES256, Algorithm.ES384, Algorithm.RS256, Algorithm.PS256
)}
_NULL_TICKET = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)
# (sigAlg, hashAlg) a TPMT_SIGNATURE must carry for each algorithm.
_SIG_IDS: dict[Algorithm, tuple[int, int]] = {
    alg: (int(scheme.scheme), int(scheme.details.any.hashAlg)) for alg, scheme in _SCHEMES.items()
}


def _tpm2b(raw: bytes, offset: int) -> tuple[bytes, int]:
    (size,) = struct.unpack_from(">H", raw, offset)
    end = offset + 2 + size
    if end > len(raw):
        raise TpmError("the TPM returned a truncated signature")
    return raw[offset + 2 : end], end


def _jose_signature(alg: Algorithm, sig: Any) -> bytes:
    """TPMT_SIGNATURE -> JOSE form (ECDSA: fixed-width r||s; RSA: the signature bytes).

    Parsed from the structure's marshalled form (TPM 2.0 Part 2, TPMT_SIGNATURE:
    ``sigAlg``, ``hash``, then TPM2B ``r`` and ``s`` for ECDSA or one TPM2B for
    RSA) rather than through tpm2-pytss attribute access, which builds wrapper
    objects per field and cost ~80 µs per signature here (marshal: ~5 µs).
    """
    raw = bytes(sig.marshal())
    if len(raw) < 4 or struct.unpack_from(">HH", raw) != _SIG_IDS[alg]:
        raise TpmError(f"the TPM returned a signature of another scheme than {alg.value}")
    spec = alg.spec
    if spec.family == "ec":
        # The TPM may return r or s shorter than the coordinate size (leading zeros).
        size = spec.coordinate_size
        r, offset = _tpm2b(raw, 4)
        s, _ = _tpm2b(raw, offset)
        if len(r) > size or len(s) > size:
            raise TpmError("the TPM returned an oversized ECDSA signature")
        return r.rjust(size, b"\0") + s.rjust(size, b"\0")
    signature, _ = _tpm2b(raw, 4)
    return signature


@dataclass(frozen=True)
class _Entry:
    """A parsed key blob and what we derived from it; ``stamp`` detects file changes."""

    stamp: tuple[int, int, int]
    alg: Algorithm
    tss: Any  # TSSPrivKey
    public_key: PublicKeyTypes
    attributes: TPMA_OBJECT


# ---- the ESAPI context, its lock, the primary and the loaded keys -------------

#: What a loaded key is filed under: (key directory, key name). Stores sharing a
#: context may use the same name in different directories.
_LoadedKey = tuple[str, str]


class TpmSlotsExhaustedError(TpmError):
    """The TPM has no free object slot, even after we flushed the keys we keep loaded."""


class _TpmContext:
    """One ESAPI context, one cached primary, a small LRU of loaded signing keys.

    Shared by every :class:`TpmKeyStore` of this process on the same TCTI string
    (see :func:`_attach`): on a TPM without resource manager, one primary and one
    cache for the whole process is what leaves object slots for anybody else.

    Every use of the context happens with :attr:`lock` held, on the caller's
    thread.  ESAPI forbids two threads using one context *at the same time*
    ("No two threads are allowed the same ESAPI context simultaneously", TCG
    ESAPI spec); used serially from several threads it is fine: tss2-esys,
    tss2-sys, tss2-mu and the device/swtpm/mssim TCTIs keep no thread-local
    state (checked: no TLS segment in the Debian libraries; only tss2-rc has
    one, a per-thread buffer for error strings), tpm2-pytss keeps none either,
    and rust-tss-esapi marks its context Send + Sync behind ``&mut``.  The lock
    replaced a worker thread that owned the context: handing each call to it cost
    ~100-115 µs (queue + Event + two thread switches), ~15% of a swtpm signature.
    """

    def __init__(self, tcti: str) -> None:
        self.tcti = tcti
        #: How many keys stay loaded: the largest ``loaded_key_cache`` of the stores
        #: attached (the cache is shared, so two stores still take one primary and
        #: this many keys, not the sum).
        self.capacity = 0
        self._users: dict[int, int] = {}  # attach token -> that store's loaded_key_cache
        self._next_token = 0
        # Reentrant so that a nested call on the same thread cannot deadlock.
        self.lock = threading.RLock()
        self.closed = False
        self._ectx: Any = None  # ESAPI
        self._primary: Any = None  # ESYS_TR
        self._primary_name: bytes = b""
        # The TPM's (resetCount, restartCount) when the primary was made: every
        # transient object is gone once either changes (TPM2_Startup).
        self._epoch: tuple[int, int] | None = None
        # Objects of a connection dropped on a transport error, which the TPM may
        # still hold: (epoch, TPM handle, name), flushed at the next connection.
        self._stale: list[tuple[tuple[int, int] | None, int, bytes]] = []
        # key -> (the parsed blob it was loaded from, ESYS_TR); most recent last.
        self._loaded: OrderedDict[_LoadedKey, tuple[_Entry, Any]] = OrderedDict()
        # One TPM2B_DIGEST refilled per signature, under the lock: setting its
        # buffer costs ~5 µs, constructing one ~10 µs (measured). ESAPI copies it
        # into the command buffer during the call.
        self._digest = TPM2B_DIGEST()

    # -- users (the registry's lock is held) --

    def attach(self, capacity: int) -> int:
        token = self._next_token
        self._next_token += 1
        self._users[token] = capacity
        self.capacity = max(self._users.values())
        return token

    def detach(self, token: int) -> bool:
        """Forget one store; True when it was the last one."""
        self._users.pop(token, None)
        self.capacity = max(self._users.values(), default=0)
        return not self._users

    def release(self, key_dir: str) -> None:
        """A store closed while others stay: flush its loaded keys, trim the cache."""
        if not self.lock.acquire(timeout=10.0):
            log.warning("TPM context busy; not flushing a closed store's keys")
            return
        try:
            if self.closed or self._ectx is None:
                return
            try:
                for key in [k for k in self._loaded if k[0] == key_dir]:
                    self.evict(key)
                while len(self._loaded) > self.capacity:
                    _, (_, handle) = self._loaded.popitem(last=False)
                    self._flush(handle)
            except TSS2_Exception as e:
                if is_device_loss(e):
                    self._lose()
                log.debug("flushing a closed store's keys failed: %s", e)
        finally:
            self.lock.release()

    def shutdown(self) -> None:
        """Flush loaded keys and the primary, finalize ESAPI. Idempotent."""
        # Bounded: at interpreter exit a daemon thread may be stuck in a TPM call
        # while holding the lock; better to leave than to hang the exit.
        if not self.lock.acquire(timeout=10.0):
            log.warning("TPM context busy at shutdown; not flushing its handles")
            return
        try:
            if not self.closed:
                self.closed = True
                self._disconnect()
        finally:
            self.lock.release()

    # -- below: lock held --

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
            self._flush_stale()
            self._create_primary()
        except BaseException:
            self._lose()  # remembers the primary if it was made before the failure
            raise

    def _read_epoch(self) -> tuple[int, int] | None:
        try:
            clock = self._ectx.read_clock().clockInfo
        except TSS2_Exception as e:
            if is_device_loss(e):
                raise
            return None
        return int(clock.resetCount), int(clock.restartCount)

    def _tpm_restarted(self) -> bool:
        """True only if the TPM provably started up again since our primary was made."""
        if self._epoch is None:
            return False
        epoch = self._read_epoch()
        return epoch is not None and epoch != self._epoch

    def _create_primary(self) -> None:
        def attempt() -> tuple[Any, Any]:
            primary, public, *_ = self._ectx.create_primary(
                TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=PARENT_TEMPLATE), ESYS_TR.OWNER
            )
            return primary, public

        try:
            try:
                primary, public = attempt()
            except TSS2_Exception as e:
                if _tpm_rc(e) != TPM2_RC.OBJECT_MEMORY or not self._loaded:
                    raise
                self.evict_all()
                primary, public = attempt()
        except TSS2_Exception as e:
            if is_device_loss(e):
                raise
            if _tpm_rc(e) == TPM2_RC.OBJECT_MEMORY:
                raise self._exhausted("create the storage primary", e) from e
            raise TpmError(
                f"the TPM at {self.tcti!r} refused to create the storage primary ({e}); "
                "is the owner hierarchy protected by a password?"
            ) from e
        self._primary = primary
        self._primary_name = bytes(public.get_name())
        self._epoch = None  # unknown until read: a stale primary is then matched by name
        self._epoch = self._read_epoch()

    def _exhausted(self, what: str, e: TSS2_Exception) -> TpmSlotsExhaustedError:
        return TpmSlotsExhaustedError(
            f"cannot {what}: the TPM's object slots are exhausted at {self.tcti!r} ({e}), "
            "even after flushing the keys this process keeps loaded. Without a resource "
            "manager (swtpm, mssim, /dev/tpm0) every client shares the TPM's few object "
            "slots (swtpm: 3), so only one process may use the TPM at a time; use "
            "/dev/tpmrm0 or tpm2-abrmd (--tcti tabrmd), or stop the other TPM client"
        )

    def _primary_is_ours(self) -> bool:
        try:
            _, name, _ = self._ectx.read_public(self._primary)
        except TSS2_Exception as e:
            if is_device_loss(e):
                raise
            return False
        return bytes(name) == self._primary_name

    def _forget_local(self) -> None:
        """The TPM restarted: close ESAPI's records of our objects without flushing.

        Flushing would hit whatever another client has loaded at those handle
        numbers since (no resource manager: handles are global).
        """
        records = [handle for _, handle in self._loaded.values()]
        self._loaded.clear()
        if self._primary is not None:
            records.append(self._primary)
        self._primary = None
        for handle in records:
            try:
                self._ectx.tr_close(handle)
            except TSS2_Exception:
                log.debug("tr_close of a stale handle failed", exc_info=True)

    def _forget_primary(self) -> None:
        # The TPM no longer holds our primary (restart, or another client flushed
        # it): drop the loaded keys too, flushing them only if the TPM did not
        # restart (then they may still be loaded; else the handles are not ours).
        if self._tpm_restarted():
            self._forget_local()
        else:
            self.evict_all()
            if self._primary is not None:
                try:
                    self._ectx.tr_close(self._primary)
                except TSS2_Exception:
                    log.debug("tr_close of a stale primary failed", exc_info=True)
            self._primary = None
        # If this fails the context stays, without primary: the next call (device())
        # tries again, and every failure is a custos error.
        self._create_primary()

    def _lose(self) -> None:
        """Transport failure: remember what the TPM may still hold, drop the context."""
        ectx = self._ectx
        if ectx is not None:
            objects = [handle for _, handle in self._loaded.values()]
            if self._primary is not None:
                objects.append(self._primary)
            for tr in objects:
                self._remember_stale(tr)
        self._drop()

    def _remember_stale(self, tr: Any) -> None:
        """Note an object the TPM may still hold after a transport failure, so
        that the next connection (or close) can flush it."""
        ectx = self._ectx
        if ectx is None:
            return
        try:  # local ESYS look-ups, no TPM command
            handle = int(ectx.tr_get_tpm_handle(tr))
            name = bytes(ectx.tr_get_name(tr))
        except Exception:  # best effort; the handle is then left
            log.debug("cannot read a lost handle's metadata", exc_info=True)
            return
        if (self._epoch, handle, name) not in self._stale:
            self._stale.append((self._epoch, handle, name))

    def _flush_stale(self) -> None:
        """Flush objects a dropped connection left in the TPM (it may never have gone away).

        Only while the TPM has not started up again since they were made (else they
        are gone and anything at those handles is someone else's), and only if the
        object at the handle still has our object's name.
        """
        if not self._stale:
            return
        ectx = self._ectx
        epoch = self._read_epoch()
        for was, handle, name in list(self._stale):
            if was is None or was == epoch:
                try:
                    tr = ectx.tr_from_tpmpublic(handle)  # TPM2_ReadPublic
                except TSS2_Exception as e:
                    if is_device_loss(e):
                        raise
                    tr = None  # not loaded any more
                if tr is not None:
                    try:
                        if bytes(ectx.tr_get_name(tr)) == name:
                            log.info("flushing handle %#x left by a lost TPM connection", handle)
                            ectx.flush_context(tr)
                        else:
                            ectx.tr_close(tr)
                    except TSS2_Exception as e:
                        if is_device_loss(e):
                            raise
                        log.debug("flushing stale handle %#x failed: %s", handle, e)
            self._stale.remove((was, handle, name))

    def _drop(self) -> None:
        # The context is unusable: closing it frees every ESYS_TR with it.
        ectx, self._ectx, self._primary = self._ectx, None, None
        self._loaded.clear()
        if ectx is not None:
            try:
                ectx.close()
            except Exception:
                log.debug("closing a broken ESAPI context failed", exc_info=True)

    def _disconnect(self) -> None:
        if self._ectx is None and self._stale:
            # Lost earlier and never reconnected: a TPM that is still up still holds them.
            try:
                self._ectx = ESAPI(self.tcti)
            except Exception:  # best effort at close
                log.debug("cannot reconnect to flush stale handles", exc_info=True)
        if self._ectx is not None:
            try:
                self._flush_stale()
                self.evict_all()
                if self._primary is not None:
                    self._ectx.flush_context(self._primary)
            except TSS2_Exception:
                log.debug("flushing handles at close failed", exc_info=True)
        self._drop()

    def _flush(self, handle: Any) -> None:
        """Flush a loaded key; if the TPM no longer has it, free ESAPI's record of it."""
        try:
            self._ectx.flush_context(handle)
        except TSS2_Exception as e:
            if is_device_loss(e):
                # Popped from the cache (or never in it: a key loaded for one
                # signature), so _lose() would not see it: remember it here.
                self._remember_stale(handle)
                raise
            log.debug("flushing a loaded key failed (%s); dropping the local record", e)
            try:
                self._ectx.tr_close(handle)
            except TSS2_Exception:
                log.debug("tr_close of a stale key handle failed", exc_info=True)

    def is_loaded(self, key: _LoadedKey) -> bool:
        return key in self._loaded

    def evict(self, key: _LoadedKey) -> None:
        """Flush ``key`` if it is loaded (deleted or changed key)."""
        loaded = self._loaded.pop(key, None)
        if loaded is not None and self._ectx is not None:
            self._flush(loaded[1])

    def evict_all(self) -> None:
        while self._loaded:
            _, (_, handle) = self._loaded.popitem(last=False)
            self._flush(handle)

    def device(self, op: Callable[[Any], T]) -> T:
        """Run ``op(ectx)`` under the lock; connect first; translate every failure."""
        with self.lock:
            if self.closed:
                raise KeyStoreError("the tpm key store is closed", code="store_closed")
            try:
                if self._ectx is None:
                    self._connect()
                elif self._primary is None:
                    self._create_primary()  # an earlier re-creation failed: try again
                return op(self._ectx)
            except TSS2_Exception as e:
                if is_device_loss(e):
                    self._lose()
                    raise DeviceUnavailableError(
                        f"lost the TPM at {self.tcti!r} ({e}); the store reconnects by "
                        "itself once the device is back, and no key is lost"
                    ) from e
                raise TpmError(f"TPM error: {e}") from e
            except KeyStoreError:
                raise
            except OSError as e:  # the key directory, not the TPM (a blob unreadable, say)
                raise BadKeyBlobError(f"cannot read the key file: {e.strerror or e}") from e
            except Exception as e:  # a tpm2-pytss surprise: still a custos error
                raise TpmError(f"unexpected failure talking to the TPM: {e!r}") from e

    def load(self, name: str, tss: Any) -> Any:
        """Load a key under the cached primary (:meth:`_under_primary`)."""
        return self._under_primary(
            f"load key {name!r}", lambda: self._ectx.load(self._primary, tss.private, tss.public)
        )

    def create(self, template: TPMT_PUBLIC) -> tuple[Any, Any]:
        """TPM2_Create under the cached primary (:meth:`_under_primary`)."""

        def call() -> tuple[Any, Any]:
            private, public, *_ = self._ectx.create(
                self._primary, TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=template)
            )
            return private, public

        return self._under_primary("create a key", call)

    def _under_primary(self, what: str, call: Callable[[], T]) -> T:
        """``call()``, a command under the cached primary, retried once.

        Out of object slots (another client of a TPM without resource manager
        holds them; TPM2_Load and TPM2_Create both need a free one): flush our
        loaded keys and retry.  A stale primary (the TPM restarted, or another
        client flushed it): re-create it and retry.  ``call`` reads
        ``self._primary`` when it runs, so the retry uses the new one.
        """
        try:
            return call()
        except TSS2_Exception as e:
            if is_device_loss(e):
                raise
            if _tpm_rc(e) == TPM2_RC.OBJECT_MEMORY:
                if not self._loaded:
                    raise self._exhausted(what, e) from e
                self.evict_all()
            elif self._primary_is_ours():
                raise
            else:
                log.info("the TPM no longer holds our primary (restarted?); re-creating it")
                self._forget_primary()
        try:
            return call()
        except TSS2_Exception as e:
            if not is_device_loss(e) and _tpm_rc(e) == TPM2_RC.OBJECT_MEMORY:
                raise self._exhausted(what, e) from e
            raise

    def sign(self, key: _LoadedKey, entry: _Entry, hashed: bytes, keep: bool) -> Any:
        """TPM2_Sign with ``key``, loading it (LRU) unless it is loaded already.

        ``keep``: the calling store's ``loaded_key_cache`` is not 0.
        """
        digest = self._digest
        digest.buffer = hashed
        loaded = self._loaded.get(key)
        if loaded is not None and loaded[0].stamp == entry.stamp:
            self._loaded.move_to_end(key)
            try:
                return self._ectx.sign(loaded[1], digest, _SCHEMES[entry.alg], _NULL_TICKET)
            except TSS2_Exception as e:
                if is_device_loss(e):
                    raise
                # The key signed before with this very scheme, so the handle went
                # stale (TPM restart, or another client flushed it): start over.
                log.info("loaded key %r failed to sign (%s); reloading it", key[1], e)
                if self._tpm_restarted():
                    self._forget_local()
                    self._create_primary()
                else:
                    self.evict_all()
        elif loaded is not None:
            self.evict(key)  # the blob changed on disk: never sign with the old key
        # Make room first: swtpm has three object slots and no resource manager; a
        # store that keeps no key loaded still never holds more than the cache would.
        room = max(self.capacity, 1)
        while self._loaded and len(self._loaded) >= room:
            _, (_, old) = self._loaded.popitem(last=False)
            self._flush(old)
        try:
            handle = self.load(key[1], entry.tss)
        except TSS2_Exception as e:
            if is_device_loss(e):
                raise
            raise TpmError(
                f"the TPM refused to load key {key[1]!r} ({e}): the blob is corrupt "
                "or was made by another TPM or under another owner seed"
            ) from e
        keep = keep and self.capacity > 0
        try:
            signature = self._ectx.sign(handle, digest, _SCHEMES[entry.alg], _NULL_TICKET)
        except BaseException:
            keep = False  # a key that failed to sign is not kept loaded
            raise
        finally:
            if keep:
                self._loaded[key] = (entry, handle)
            else:
                self._flush(handle)
        return signature


# One context per (process, TCTI string): stores in one process share the primary
# and the loaded-key cache (two stores no longer need two primaries and two
# caches, which is more than swtpm's three slots); closed with its last store.
# Per process: a forked child makes its own.
_CONTEXTS: dict[tuple[int, str], _TpmContext] = {}
# Reentrant: a store's finalizer (_detach) can run from the garbage collector
# on a thread that is inside _attach already, and would deadlock on a plain Lock.
_CONTEXTS_LOCK = threading.RLock()


def _attach(tcti: str, capacity: int) -> tuple[_TpmContext, int]:
    with _CONTEXTS_LOCK:
        key = (os.getpid(), tcti)
        while True:
            ctx = _CONTEXTS.get(key)
            if ctx is None or ctx.closed:
                ctx = _CONTEXTS[key] = _TpmContext(tcti)
            token = ctx.attach(capacity)
            # A finalizer run by the GC in between may have closed ctx (its
            # last other user went away): attach to a fresh one instead.
            if not ctx.closed:
                return ctx, token


def _detach(ctx: _TpmContext, token: int, key_dir: str) -> None:
    """One store lets go: the last one closes the context, others flush their keys."""
    with _CONTEXTS_LOCK:
        last = ctx.detach(token)
        if last:
            key = (os.getpid(), ctx.tcti)
            if _CONTEXTS.get(key) is ctx:
                del _CONTEXTS[key]
    if last:
        ctx.shutdown()
    else:
        ctx.release(key_dir)


# ---- the store --------------------------------------------------------------


class TpmKeyStore(KeyStore):
    """Named signing keys in a TPM 2.0, kept as ``TSS2 PRIVATE KEY`` blobs in ``key_dir``."""

    kind = "tpm"
    supported_algorithms: ClassVar[frozenset[Algorithm]] = frozenset(
        {Algorithm.ES256, Algorithm.ES384, Algorithm.RS256, Algorithm.PS256}
    )

    def __init__(
        self,
        tcti: str = DEFAULT_TCTI,
        key_dir: Path | str = DEFAULT_KEY_DIR,
        *,
        loaded_key_cache: int = 1,
    ) -> None:
        if isinstance(loaded_key_cache, bool) or not isinstance(loaded_key_cache, int) or (
            loaded_key_cache < 0
        ):
            raise StoreConfigError("loaded_key_cache is a number of keys, 0 or more")
        self.tcti = tcti
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
        self._tpm, token = _attach(tcti, loaded_key_cache)
        # Let go of the context even if nobody calls close(): on swtpm (no resource
        # manager) a leaked transient holds one of three object slots until restart.
        self._finalizer = weakref.finalize(self, _detach, self._tpm, token, self._key_dir_str)
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

    def _check_open(self) -> None:
        if self._closed:
            raise KeyStoreError("the tpm key store is closed", code="store_closed")

    # -- files --

    def _path(self, name: str) -> Path:
        return self.key_dir / f"{name}{SUFFIX}"

    def _entry(self, name: str) -> _Entry:
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
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())  # the stamp of what we read, not of what we stat'ed
                pem = f.read()
        except FileNotFoundError:  # deleted between stat and open
            self._gone(name)
        except OSError as e:  # a directory in its place, no permission, an I/O error
            raise BadKeyBlobError(f"cannot read key file {name!r}: {e.strerror or e}") from e
        entry = self._parse(name, pem, (st.st_ino, st.st_mtime_ns, st.st_size))
        with self._cache_lock:
            self._cache[name] = entry
        return entry

    def _gone(self, name: str) -> NoReturn:
        with self._cache_lock:
            self._cache.pop(name, None)
        self._evict(name)  # deleted behind our back: never sign with it again
        raise KeyNotFoundError(f"no key {name!r} in the {self.kind} store") from None

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
        self._check_open()
        try:
            private, public = self._tpm.device(lambda ectx: self._tpm.create(template))
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
        return self._entry(info.name).public_key

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
            if entry.alg is not info.alg:
                raise KeyStoreError(f"key {name!r} changed while signing; try again")
            return tpm.sign(key, entry, hashed, keep)

        return _jose_signature(info.alg, tpm.device(op))

    # -- extras for tests and operators --

    def key_attributes(self, name: str) -> TPMA_OBJECT:
        """The TPMA_OBJECT attributes recorded in the key's public area (no TPM call)."""
        return self._entry(check_key_name(name)).attributes

    def key_path(self, name: str) -> Path:
        """Where the key's ``TSS2 PRIVATE KEY`` blob lives."""
        return self._path(check_key_name(name))

    def close(self) -> None:
        self._closed = True
        self._finalizer()
