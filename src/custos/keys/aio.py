"""An asyncio interface over any :class:`~custos.keys.base.KeyStore`.

The agent serves its sockets with grpclib (asyncio); key stores talk to a TPM or a
PKCS#11 token with blocking calls.  :class:`AsyncKeyStore` runs each call in a
worker thread so the event loop never blocks on a device, and lets at most one
call per device be in flight:

- one :class:`asyncio.Lock` per device per event loop, shared by every facade
  whose store names the same device (:attr:`KeyStore.device_id`: the TCTI for a
  TPM, the library file for PKCS#11, the store itself for software stores).
  Waiting callers queue on the lock in the loop instead of parking worker threads
  on the store's own lock, and a slow device cannot take every worker thread;
- a cancelled caller gives up waiting, but a call already handed to its thread
  keeps the device (and the lock) until the thread is done: a second call never
  starts while a first still runs, and the store stays usable;
- errors are the store's own custos errors, unchanged (``KeyNotFoundError``,
  ``DeviceUnavailableError``, ...); after :meth:`AsyncKeyStore.close` every call
  raises :class:`~custos.keys.errors.StoreClosedError`.

Only the standard library and :mod:`custos.keys.base`: importing this module
loads no device library.
"""

from __future__ import annotations

import asyncio
import functools
import weakref
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from custos.keys.algorithms import Algorithm
from custos.keys.base import KeyInfo, KeyStore
from custos.keys.errors import StoreClosedError

T = TypeVar("T")

# Per event loop (an asyncio.Lock belongs to one loop), per device.  Weak on the loop:
# a loop that is closed and dropped takes its locks with it.
_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Hashable, asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)


def device_lock(store: KeyStore) -> asyncio.Lock:
    """The running loop's lock for the device behind ``store`` (one per device)."""
    loop = asyncio.get_running_loop()
    locks = _LOCKS.setdefault(loop, {})
    device = store.device_id
    lock = locks.get(device)
    if lock is None:
        lock = locks[device] = asyncio.Lock()
    return lock


class AsyncKeyStore:
    """``await``-able calls on ``store``; see the module docstring.

    ``executor`` runs the blocking calls (default: the loop's default executor).
    The facade owns ``store``: :meth:`close` closes it.
    """

    def __init__(self, store: KeyStore, *, executor: Executor | None = None) -> None:
        if not isinstance(store, KeyStore):
            raise TypeError(f"AsyncKeyStore wraps a KeyStore, not {type(store).__name__}")
        self._store = store
        self._executor = executor
        self._closed = False

    @property
    def store(self) -> KeyStore:
        """The wrapped store (for its synchronous calls, e.g. ``key_uri``)."""
        return self._store

    @property
    def kind(self) -> str:
        return self._store.kind

    def __repr__(self) -> str:
        return f"AsyncKeyStore({self._store!r})"

    # ---- the one way to the device --------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise StoreClosedError(f"the async {self._store.kind} key store is closed")
        lock = device_lock(self._store)
        await lock.acquire()  # a caller cancelled here just leaves the queue
        try:
            if self._closed:  # closed while this call waited for the device
                raise StoreClosedError(f"the async {self._store.kind} key store is closed")
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(self._executor, functools.partial(fn, *args))
        except BaseException:
            lock.release()
            raise
        # The lock is released when the thread is done, not when the caller stops
        # waiting: a cancelled caller must not let the next call onto a busy device.
        future.add_done_callback(functools.partial(_release, lock))
        # shield: cancelling the caller must not cancel (mark done) the future early.
        return await asyncio.shield(future)

    # ---- KeyStore calls -------------------------------------------------------------

    async def create(self, name: str, alg: Algorithm | str = Algorithm.ES256) -> KeyInfo:
        return await self._call(self._store.create, name, alg)

    async def info(self, name: str) -> KeyInfo:
        return await self._call(self._store.info, name)

    async def list(self) -> list[KeyInfo]:
        return await self._call(self._store.list)

    async def delete(self, name: str) -> None:
        await self._call(self._store.delete, name)

    async def public_key(self, name: str) -> PublicKeyTypes:
        return await self._call(self._store.public_key, name)

    async def public_jwk(self, name: str) -> dict[str, Any]:
        return await self._call(self._store.public_jwk, name)

    async def sign(self, name: str, data: bytes) -> bytes:
        """JOSE-form signature of ``data`` (see :meth:`KeyStore.sign`)."""
        return await self._call(self._store.sign, name, data)

    async def sign_digest(self, name: str, hashed: bytes) -> bytes:
        return await self._call(self._store.sign_digest, name, hashed)

    async def close(self) -> None:
        """Wait for the call in flight, then close the store. Idempotent."""
        if self._closed:
            return
        self._closed = True
        lock = device_lock(self._store)
        async with lock:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._store.close)

    async def __aenter__(self) -> AsyncKeyStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _release(lock: asyncio.Lock, future: asyncio.Future[Any]) -> None:
    lock.release()
    if not future.cancelled():
        # Retrieved here so that the error of a call whose caller was cancelled is
        # not reported as "Future exception was never retrieved".
        future.exception()


__all__ = ["AsyncKeyStore", "device_lock"]
