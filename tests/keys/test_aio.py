"""The asyncio facade (:mod:`custos.keys.aio`) against real SoftHSM and swtpm.

What it promises: concurrent tasks get their signatures, at most one call per
device is in flight (also across two facades on one device), errors are the
store's own custos classes, a cancelled task leaves the store usable, and a
closed facade says ``StoreClosedError``.

The stores are the real backends, subclassed only to count how many calls are
inside the store at once (above the store's own locks, so the count measures the
facade): a short sleep inside widens the window in which a second call would
overlap if the facade let it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from custos.keys import (
    KeyExistsError,
    KeyNotFoundError,
    KeyStore,
    MemoryKeyStore,
    UnsupportedAlgorithmError,
)
from custos.keys.aio import AsyncKeyStore, device_lock
from custos.keys.errors import StoreClosedError
from custos.keys.pkcs11 import Pkcs11KeyStore
from custos.keys.signatures import raw_to_der
from custos.keys.tpm import TpmKeyStore
from custos.testing.softhsm import SoftHSMToken


class Gauge:
    """How many calls are inside the store now, and at most."""

    def __init__(self, hold: float = 0.003) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0
        self.calls = 0
        self.hold = hold
        self.entered = threading.Event()

    def __enter__(self) -> None:
        with self.lock:
            self.now += 1
            self.calls += 1
            self.most = max(self.most, self.now)
        self.entered.set()
        time.sleep(self.hold)  # a window for an overlapping call to show

    def __exit__(self, *exc: object) -> None:
        with self.lock:
            self.now -= 1


class GaugedPkcs11(Pkcs11KeyStore):
    gauge: Gauge

    def sign(self, name: str, data: bytes) -> bytes:
        with self.gauge:
            return super().sign(name, data)


class GaugedTpm(TpmKeyStore):
    gauge: Gauge

    def sign(self, name: str, data: bytes) -> bytes:
        with self.gauge:
            return super().sign(name, data)


def _verify(pub: object, data: bytes, sig: bytes) -> None:
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(raw_to_der(sig, 32), data, ec.ECDSA(hashes.SHA256()))


@pytest.fixture(params=["pkcs11", "tpm"])
def two_stores(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[KeyStore, KeyStore, Gauge]]:
    """Two stores on one device, sharing one gauge, and an ES256 key ``aio-k`` in both."""
    gauge = Gauge()
    stores: list[Any] = []
    if request.param == "pkcs11":
        token: SoftHSMToken = request.getfixturevalue("softhsm")  # a fresh token per test
        for _ in range(2):
            stores.append(GaugedPkcs11(token.module, token.uri))
    else:
        tpm = request.getfixturevalue("swtpm")
        for _ in range(2):
            stores.append(GaugedTpm(tpm.tcti, tmp_path / "keys"))
    for s in stores:
        s.gauge = gauge
    stores[0].create("aio-k", "ES256")
    yield stores[0], stores[1], gauge
    for s in stores:
        s.close()


def test_concurrent_tasks_one_call_in_flight_per_device(
    two_stores: tuple[KeyStore, KeyStore, Gauge],
) -> None:
    a, b, gauge = two_stores
    assert a.device_id == b.device_id

    async def main() -> None:
        fa, fb = AsyncKeyStore(a), AsyncKeyStore(b)
        assert device_lock(a) is device_lock(b)
        messages = [f"m{i}".encode() for i in range(16)]
        sigs = await asyncio.gather(
            *(
                (fa if i % 2 else fb).sign("aio-k", m)
                for i, m in enumerate(messages)
            )
        )  # fmt: skip
        pub = await fa.public_key("aio-k")
        for m, sig in zip(messages, sigs, strict=True):
            _verify(pub, m, sig)

    asyncio.run(main())
    assert gauge.calls == 16
    assert gauge.most == 1, f"{gauge.most} calls were inside the device at once"


def test_the_event_loop_keeps_running_while_the_device_works(
    two_stores: tuple[KeyStore, KeyStore, Gauge],
) -> None:
    a, _, gauge = two_stores
    gauge.hold = 0.05

    async def main() -> int:
        ticks = 0
        signing = asyncio.create_task(AsyncKeyStore(a).sign("aio-k", b"x"))
        while not signing.done():
            ticks += 1
            await asyncio.sleep(0)
        await signing
        return ticks

    # The loop ran other work while the signature was being made in a thread.
    assert asyncio.run(main()) > 1


def test_errors_are_the_stores_own_classes(
    two_stores: tuple[KeyStore, KeyStore, Gauge],
) -> None:
    a, _, _ = two_stores

    async def main() -> None:
        facade = AsyncKeyStore(a)
        with pytest.raises(KeyNotFoundError):
            await facade.sign("no-such-key", b"x")
        with pytest.raises(KeyNotFoundError):
            await facade.info("no-such-key")
        with pytest.raises(KeyExistsError):
            await facade.create("aio-k", "ES256")
        with pytest.raises(UnsupportedAlgorithmError):
            await facade.sign_digest("aio-k", b"\0" * 31)
        # ...and the store still works after each of them.
        names = [k.name for k in await facade.list()]
        assert "aio-k" in names
        assert (await facade.info("aio-k")).alg.value == "ES256"
        assert (await facade.public_jwk("aio-k"))["crv"] == "P-256"
        assert len(await facade.sign_digest("aio-k", b"\1" * 32)) == 64
        await facade.create("aio-tmp", "ES256")
        await facade.delete("aio-tmp")
        with pytest.raises(KeyNotFoundError):
            await facade.info("aio-tmp")

    asyncio.run(main())


def test_a_cancelled_task_leaves_the_store_usable(
    two_stores: tuple[KeyStore, KeyStore, Gauge],
) -> None:
    a, b, gauge = two_stores
    gauge.hold = 0.05

    async def main() -> None:
        fa, fb = AsyncKeyStore(a), AsyncKeyStore(b)
        in_flight = asyncio.create_task(fa.sign("aio-k", b"first"))
        while not gauge.entered.is_set():  # the first call is inside the device
            await asyncio.sleep(0.001)
        queued = asyncio.create_task(fb.sign("aio-k", b"queued"))
        after = asyncio.create_task(fb.sign("aio-k", b"after"))
        await asyncio.sleep(0)
        in_flight.cancel()
        queued.cancel()
        for task in (in_flight, queued):
            with pytest.raises(asyncio.CancelledError):
                await task
        sig = await after  # waited for the cancelled call's thread, then ran
        _verify(await fb.public_key("aio-k"), b"after", sig)
        _verify(await fa.public_key("aio-k"), b"again", await fa.sign("aio-k", b"again"))

    asyncio.run(main())
    assert gauge.most == 1
    assert gauge.calls == 3  # first (cancelled while in the device), after, again


def test_closed_facade_raises_store_closed(tmp_path: Path) -> None:
    async def main() -> None:
        facade = AsyncKeyStore(MemoryKeyStore())
        await facade.create("k", "ES256")
        await facade.close()
        await facade.close()  # idempotent
        for call in (facade.sign("k", b"x"), facade.list(), facade.info("k")):
            with pytest.raises(StoreClosedError) as info:
                await call
            assert info.value.code == "store_closed"

    asyncio.run(main())


def test_closing_waits_for_the_call_in_flight_and_refuses_queued_ones(
    two_stores: tuple[KeyStore, KeyStore, Gauge],
) -> None:
    a, _, gauge = two_stores
    gauge.hold = 0.05

    async def main() -> None:
        facade = AsyncKeyStore(a)
        first = asyncio.create_task(facade.sign("aio-k", b"first"))
        while not gauge.entered.is_set():
            await asyncio.sleep(0.001)
        queued = asyncio.create_task(facade.sign("aio-k", b"queued"))
        await asyncio.sleep(0)
        await facade.close()
        assert len(await first) == 64  # the call in flight finished normally
        with pytest.raises(StoreClosedError):
            await queued

    asyncio.run(main())


def test_software_stores_are_separate_devices() -> None:
    one, two = MemoryKeyStore(), MemoryKeyStore()
    assert one.device_id != two.device_id

    async def main() -> None:
        assert device_lock(one) is not device_lock(two)
        assert device_lock(one) is device_lock(one)

    asyncio.run(main())


def test_tpm_stores_on_one_tcti_share_a_device(swtpm: Any, tmp_path: Path) -> None:
    with TpmKeyStore(swtpm.tcti, tmp_path / "a") as a, TpmKeyStore(swtpm.tcti, tmp_path / "b") as b:
        assert a.device_id == b.device_id == ("tpm", swtpm.tcti)
