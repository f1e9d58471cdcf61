"""The shared ESAPI context: one per TCTI per process, with its lock, the storage
primary, object-slot accounting and the flush of handles a lost connection left.

Threads
    ESAPI contexts are not thread-safe: a context is used under one lock, on the
    calling thread (see :class:`TpmContext` for why serial use from several threads
    is sound; handing each call to a dedicated worker thread cost ~100-115 µs).
    The primary is created once per connection and kept loaded (measured on swtpm:
    creating it costs about 2.7 ms, a whole signature about 0.9 ms).

One context per TCTI per process
    Every user of a TCTI string in a process (:func:`attach`) shares one context:
    one ESAPI connection, one primary, one loaded-key cache (sized to the largest
    capacity asked for), reference-counted and closed with the last user
    (:func:`detach`).  So ``custos dev`` (server and agent in one process on one
    swtpm) takes two object slots, not four.  Two *processes* cannot share a TPM
    without resource manager reliably: see
    docs/decisions/0010-tpm-no-resource-manager.md.

Loaded keys
    The last ``capacity`` keys used stay loaded between signatures (an LRU); 0
    loads and flushes the key around every signature.  Every object counts against
    swtpm's three slots (no resource manager; the primary takes one).  Evicted keys
    are flushed before another is loaded; a key whose file changed (another stamp)
    is flushed and loaded again; a key whose signature fails is flushed;
    ``TPM_RC_OBJECT_MEMORY`` on load, create or create-primary flushes our loaded
    keys and retries once, then raises :class:`TpmSlotsExhaustedError`; a loaded key
    that stops signing (the TPM restarted, or another client flushed it) is
    forgotten with every other loaded key and the signature retried once from a
    fresh load.  If the TPM's reset/restart counters moved, old handles are only
    closed in ESAPI, never flushed: those numbers may now be another client's.

Connection and device loss
    Any TCTI or I/O failure raises :class:`DeviceUnavailableError`; the context is
    dropped and the next call reconnects by itself.  The handle numbers and names of
    what we had loaded are kept; on reconnecting (or at close), each one the TPM
    still holds under the same name is flushed, provided the TPM's reset/restart
    counters have not moved since.

Key check (issue 7 item 10)
    :meth:`TpmContext.verify` loads a key file's blob and compares the name the TPM
    computes for the loaded object with the name of the file's public area: a file
    whose public area was swapped for another key's fails TPM2_Load (the private
    part's integrity value covers the public area's name) or, failing that, the
    comparison.  Callers do it once per file stamp.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_RC
from tpm2_pytss.types import (
    TPM2B_DIGEST,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMT_PUBLIC,
)

from custos.keys.errors import (
    DeviceUnavailableError,
    KeyStoreError,
    StoreClosedError,
    StoreConfigError,
)
from custos.tpm.blobs import KeyBlob, Stamp
from custos.tpm.errors import (
    BadKeyBlobError,
    TpmError,
    TpmSlotsExhaustedError,
    is_device_loss,
    tpm_rc,
)
from custos.tpm.signatures import NULL_TICKET, SCHEMES
from custos.tpm.tcti import validate_tcti
from custos.tpm.templates import PARENT_TEMPLATE

log = logging.getLogger(__name__)

T = TypeVar("T")

#: What a loaded key is filed under: (key directory, key name). Users sharing a
#: context may use the same name in different directories.
LoadedKey = tuple[str, str]


def open_esapi(tcti: str) -> Any:
    """A new ESAPI context on ``tcti`` (validated), every failure a custos error."""
    validate_tcti(tcti)
    try:
        return ESAPI(tcti)
    except TSS2_Exception as e:
        if is_device_loss(e):
            raise DeviceUnavailableError(
                f"cannot reach the TPM at {tcti!r} ({e}): is the device present "
                "(/dev/tpmrm0) or the simulator running?"
            ) from e
        raise StoreConfigError(f"invalid TPM TCTI {tcti!r}: {e}") from e


class TpmContext:
    """One ESAPI context, one cached primary, a small LRU of loaded signing keys.

    Shared by every :class:`TpmKeyStore` of this process on the same TCTI string
    (see :func:`attach`): on a TPM without resource manager, one primary and one
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
        # key -> (the stamp of the file it was loaded from, ESYS_TR); most recent last.
        self._loaded: OrderedDict[LoadedKey, tuple[Stamp, Any]] = OrderedDict()
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
        self._ectx = open_esapi(self.tcti)
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
                if tpm_rc(e) != TPM2_RC.OBJECT_MEMORY or not self._loaded:
                    raise
                self.evict_all()
                primary, public = attempt()
        except TSS2_Exception as e:
            if is_device_loss(e):
                raise
            if tpm_rc(e) == TPM2_RC.OBJECT_MEMORY:
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
                self._ectx = open_esapi(self.tcti)
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

    def is_loaded(self, key: LoadedKey) -> bool:
        return key in self._loaded

    def evict(self, key: LoadedKey) -> None:
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
                raise StoreClosedError("the tpm context is closed")
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
            if tpm_rc(e) == TPM2_RC.OBJECT_MEMORY:
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
            if not is_device_loss(e) and tpm_rc(e) == TPM2_RC.OBJECT_MEMORY:
                raise self._exhausted(what, e) from e
            raise

    def sign(self, key: LoadedKey, stamp: Stamp, blob: KeyBlob, hashed: bytes, keep: bool) -> Any:
        """TPM2_Sign with ``key``, loading it (LRU) unless it is loaded already.

        ``stamp``: of the file ``blob`` was read from; a key loaded from a file with
        another stamp is flushed first.  ``keep``: the caller's cache size is not 0.
        """
        digest = self._digest
        digest.buffer = hashed
        alg = blob.alg
        loaded = self._loaded.get(key)
        if loaded is not None and loaded[0] == stamp:
            self._loaded.move_to_end(key)
            try:
                return self._ectx.sign(loaded[1], digest, SCHEMES[alg], NULL_TICKET)
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
        handle = self._load_key(key, blob)
        keep = keep and self.capacity > 0
        try:
            signature = self._ectx.sign(handle, digest, SCHEMES[alg], NULL_TICKET)
        except BaseException:
            keep = False  # a key that failed to sign is not kept loaded
            raise
        finally:
            if keep:
                self._loaded[key] = (stamp, handle)
            else:
                self._flush(handle)
        return signature

    def _make_room(self) -> None:
        # Before a load: swtpm has three object slots and no resource manager; a
        # user that keeps no key loaded still never holds more than the cache would.
        room = max(self.capacity, 1)
        while self._loaded and len(self._loaded) >= room:
            _, (_, old) = self._loaded.popitem(last=False)
            self._flush(old)

    def _load_key(self, key: LoadedKey, blob: KeyBlob) -> Any:
        """Load a key file's blob, first making room in the LRU."""
        self._make_room()
        return self._load_blob(key[1], blob)

    def _load_blob(self, what: str, blob: KeyBlob) -> Any:
        try:
            return self.load(what, blob.tss)
        except TSS2_Exception as e:
            if is_device_loss(e):
                raise
            raise BadKeyBlobError(
                f"the TPM refused to load key {what!r} ({e}): the key file is corrupt, "
                "its public area does not match its private part, or it was made by "
                "another TPM or under another owner seed"
            ) from e

    def load_checked(self, what: str, blob: KeyBlob) -> Any:
        """TPM2_Load ``blob`` and check the loaded object is the key its file says.

        TPM2_ReadPublic on the loaded object: the name the TPM returns must be the
        name of the file's public area.  A refused load or another name is
        :class:`BadKeyBlobError` (nothing stays loaded).  The caller flushes the
        returned handle (:meth:`flush`).  Lock held (inside :meth:`device`).
        """
        handle = self._load_blob(what, blob)
        try:
            _, tpm_name, _ = self._ectx.read_public(handle)
            ok = bytes(tpm_name) == blob.name
        except BaseException:
            self._flush(handle)
            raise
        if not ok:
            self._flush(handle)
            raise BadKeyBlobError(
                f"key {what!r}: the TPM computes another name for the loaded key than "
                "its file's public area has; the file was tampered with"
            )
        return handle

    def verify(self, key: LoadedKey, stamp: Stamp, blob: KeyBlob, keep: bool) -> None:
        """Check with the TPM (:meth:`load_checked`) that a key file's blob is ours.

        The key then stays loaded (``keep``, as after a signature), so checking
        costs the first signature nothing extra.  Lock held.
        """
        loaded = self._loaded.pop(key, None)
        if loaded is not None:
            self._flush(loaded[1])  # loaded from another (older) file, or unchecked
        self._make_room()
        handle = self.load_checked(key[1], blob)
        if keep and self.capacity > 0:
            self._loaded[key] = (stamp, handle)
        else:
            self._flush(handle)

    def with_key(self, key: LoadedKey, stamp: Stamp, blob: KeyBlob, op: Callable[[Any], T]) -> T:
        """``op(handle)`` with key file ``key`` (read with ``stamp``) loaded, for a
        command other than a signature (TPM2_Certify of it).

        The handle the loaded-key cache holds when its store keeps the key loaded from
        this very file: the store loaded and checked it (:meth:`verify`), so the
        certify of an agent key just used for its CSR costs no TPM2_Load.  Otherwise
        the key is loaded for the call, checked (:meth:`load_checked`) and flushed
        afterwards.  A cached key is out of the cache while ``op`` runs (a load inside
        ``op`` that needs room cannot flush it), then back as the most recent; a
        command refused with it flushes it (the next use loads it again).  Lock held.
        """
        loaded = self._loaded.pop(key, None)
        if loaded is not None and loaded[0] != stamp:
            self._flush(loaded[1])  # loaded from another (older) file
            loaded = None
        if loaded is None:
            handle = self.load_checked(key[1], blob)
            try:
                return op(handle)
            finally:
                self._flush(handle)
        keep = True
        try:
            return op(loaded[1])
        except TSS2_Exception as e:
            keep = is_device_loss(e)  # back in the cache so that _lose() sees it
            raise
        finally:
            if keep:
                self._loaded[key] = loaded
            else:
                self._flush(loaded[1])

    def flush(self, handle: Any) -> None:
        """Flush a transient object the caller loaded (an attestation key, say)."""
        self._flush(handle)


# One context per (process, TCTI string): stores in one process share the primary
# and the loaded-key cache (two stores no longer need two primaries and two
# caches, which is more than swtpm's three slots); closed with its last store.
# Per process: a forked child makes its own.
_CONTEXTS: dict[tuple[int, str], TpmContext] = {}
# Reentrant: a store's finalizer (detach) can run from the garbage collector
# on a thread that is inside attach already, and would deadlock on a plain Lock.
_CONTEXTS_LOCK = threading.RLock()


def attach(tcti: str, capacity: int) -> tuple[TpmContext, int]:
    """Share (or open) this process's context on ``tcti``; ``capacity``: keys to keep loaded.

    Returns the context and a token for :func:`detach`.  Connects lazily.
    """
    validate_tcti(tcti)
    with _CONTEXTS_LOCK:
        key = (os.getpid(), tcti)
        while True:
            ctx = _CONTEXTS.get(key)
            if ctx is None or ctx.closed:
                ctx = _CONTEXTS[key] = TpmContext(tcti)
            token = ctx.attach(capacity)
            # A finalizer run by the GC in between may have closed ctx (its
            # last other user went away): attach to a fresh one instead.
            if not ctx.closed:
                return ctx, token


def detach(ctx: TpmContext, token: int, key_dir: str) -> None:
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


@contextmanager
def shared_context(tcti: str, capacity: int = 0) -> Iterator[TpmContext]:
    """This process's context on ``tcti`` for the ``with`` block (attach / detach)."""
    ctx, token = attach(tcti, capacity)
    try:
        yield ctx
    finally:
        detach(ctx, token, "")


__all__ = [
    "LoadedKey",
    "TpmContext",
    "attach",
    "detach",
    "open_esapi",
    "shared_context",
]
