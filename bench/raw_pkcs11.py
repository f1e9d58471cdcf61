"""Raw python-pkcs11 ECDSA P-256 signing: the floor the ``pkcs11`` key store is compared with.

No custos code on the measured path: one R/W session, one P-256 token key with the
store's attributes, ``C_Sign`` with ``CKM_ECDSA`` over a 32-byte digest.
Run it while no other thread of the process uses the same library (the key
store serializes its own calls; this does not take part in that lock).
"""

from __future__ import annotations

import os
import time

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag
from pkcs11.exceptions import UserAlreadyLoggedIn
from pkcs11.util.ec import encode_named_curve_parameters


def bench_raw_pkcs11_sign(module: str, token_label: str, pin: str, n: int) -> list[float]:
    """Seconds per ``C_Sign`` for ``n`` ECDSA P-256 signatures on one open session."""
    # realpath: python-pkcs11 caches libraries by path string, and a second string for
    # the same file (Debian's symlink) would C_Initialize it twice and fail.
    lib = pkcs11.lib(os.path.realpath(module))
    token = lib.get_token(token_label=token_label)
    try:
        session = token.open(rw=True, user_pin=pin)
    except UserAlreadyLoggedIn:  # a key store in this process holds the login already
        session = token.open(rw=True)
    try:
        p256 = {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}
        params = session.create_domain_parameters(KeyType.EC, p256, local=True)
        # A token key with the attributes the key store uses: SoftHSM signs with a
        # session-only key ~40% faster (it re-checks token objects on use), so that
        # would not be a fair floor.  Deleted again below.
        public, private = params.generate_keypair(
            store=True,
            label=f"custos-bench-{os.getpid()}",
            capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
            private_template={
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.DERIVE: False,
            },
        )
        digest = os.urandom(32)
        private.sign(digest, mechanism=Mechanism.ECDSA)  # warm-up
        latencies: list[float] = []
        clock = time.perf_counter
        for _ in range(n):
            start = clock()
            private.sign(digest, mechanism=Mechanism.ECDSA)
            latencies.append(clock() - start)
        private.destroy()
        public.destroy()
        return latencies
    finally:
        session.close()


def bench_pkcs11_rows(hsm: object, msg: bytes, n: int, rounds: int = 5) -> None:
    """Print the PKCS#11 rows of `make bench`: raw ``C_Sign`` vs the custos store.

    Raw and store are measured in alternating rounds so that load from other
    processes on this shared machine hits both alike.  The store's key is looked up
    (and its custody grade checked) once before timing, as in a running service.
    """
    from timing import Result, measure, row

    from custos.keys.pkcs11 import Pkcs11KeyStore

    hstore = Pkcs11KeyStore(module=hsm.module, uri=hsm.uri)  # type: ignore[attr-defined]
    hstore.create("bench", "ES256")
    raw_lat: list[float] = []
    store_lat: list[float] = []
    for _ in range(rounds):
        raw_lat += bench_raw_pkcs11_sign(
            hsm.module,  # type: ignore[attr-defined]
            hsm.token_label,  # type: ignore[attr-defined]
            hsm.pin,  # type: ignore[attr-defined]
            n // rounds,
        )
        store_lat += measure("", lambda: hstore.sign("bench", msg), n // rounds).latencies
    raw_h = Result("raw python-pkcs11 sign (SoftHSM token key)", raw_lat)
    print(row(raw_h))
    print(
        row(
            Result("custos pkcs11 store (SoftHSM)", store_lat),
            raw_h,
            note="aim <= 1.10x; >= 10,000/s",
        )
    )
    hstore.delete("bench")
    hstore.close()


if __name__ == "__main__":  # pragma: no cover - manual use
    import statistics
    import sys

    mod, label, user_pin, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    lat = bench_raw_pkcs11_sign(mod, label, user_pin, count)
    print(f"raw pkcs11 ES256 sign: p50 {statistics.median(lat) * 1e6:.1f} us, n={len(lat)}")
