"""Raw device latency: tpm2-pytss ESAPI ``TPM2_Sign`` with the key already loaded.

The floor our TPM key store is compared against: the store adds a load and a
flush per signature (swtpm holds three objects and has no resource manager), the
worker-thread hop and the JOSE encoding.

    python bench/raw_tpm.py swtpm:host=127.0.0.1,port=2321 [n]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TSS2_LOG", "esys+none")

from tpm2_pytss import ESAPI  # imported after TSS2_LOG is set
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_RH, TPM2_ST
from tpm2_pytss.types import (
    TPM2B_DIGEST,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMS_SCHEME_HASH,
    TPMT_SIG_SCHEME,
    TPMT_TK_HASHCHECK,
    TPMU_SIG_SCHEME,
)

from custos.keys.algorithms import Algorithm
from custos.tpm.templates import PARENT_TEMPLATE, key_template


def bench_raw_tpm_sign(tcti: str, n: int, warmup: int = 20) -> list[float]:
    """Per-call seconds of ``n`` ES256 TPM2_Sign calls on a key loaded once.

    Creates a primary and a P-256 key with the store's own templates, loads it,
    signs ``warmup + n`` times, then flushes both (leaves no transient behind).
    """
    scheme = TPMT_SIG_SCHEME(
        scheme=TPM2_ALG.ECDSA,
        details=TPMU_SIG_SCHEME(any=TPMS_SCHEME_HASH(hashAlg=TPM2_ALG.SHA256)),
    )
    ticket = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)
    digest = TPM2B_DIGEST(bytes(range(32)))
    out: list[float] = []
    with ESAPI(tcti) as ectx:
        primary, *_ = ectx.create_primary(
            TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=PARENT_TEMPLATE), ESYS_TR.OWNER
        )
        key = None
        try:
            private, public, *_ = ectx.create(
                primary,
                TPM2B_SENSITIVE_CREATE(),
                TPM2B_PUBLIC(publicArea=key_template(Algorithm.ES256)),
            )
            key = ectx.load(primary, private, public)
            for _ in range(warmup):
                ectx.sign(key, digest, scheme, ticket)
            clock = time.perf_counter
            for _ in range(n):
                t0 = clock()
                ectx.sign(key, digest, scheme, ticket)
                out.append(clock() - t0)
        finally:
            if key is not None:
                ectx.flush_context(key)
            ectx.flush_context(primary)
    return out


def bench_tpm_rows(tpm_tcti: str, key_dir: Path, msg: bytes, n: int, rounds: int = 5) -> None:
    """Print the raw TPM2_Sign row and the store's row against it (the 1.1x budget).

    Alternating rounds, so drift of a shared machine hits both sides. swtpm holds
    three objects: the raw run (primary + key) and an open store (primary + cached
    key) cannot coexist, so the store is reopened each round; every reopen checks
    the key file against the TPM once (issue 7 item 10), outside the timed calls.
    """
    from timing import Result, measure, row

    from custos.keys.tpm import TpmKeyStore

    with TpmKeyStore(tcti=tpm_tcti, key_dir=key_dir) as tstore:
        tstore.create("bench", "ES256")
    raw_lat: list[float] = []
    store_lat: list[float] = []
    for _ in range(rounds):
        raw_lat += bench_raw_tpm_sign(tpm_tcti, n // rounds)
        with TpmKeyStore(tcti=tpm_tcti, key_dir=key_dir) as tstore:
            tstore.sign("bench", msg)  # first use: the check against the TPM
            store_lat += measure("", lambda: tstore.sign("bench", msg), n // rounds).latencies
    raw_t = Result("raw tpm2-pytss ESAPI sign (swtpm, key loaded)", raw_lat)
    print(row(raw_t))
    print(row(Result("custos tpm store (swtpm)", store_lat), raw_t, note="aim <= 1.10x"))


if __name__ == "__main__":
    tcti = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("CUSTOS_TCTI", "device:/dev/tpmrm0")
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 500
    lat = sorted(bench_raw_tpm_sign(tcti, n))
    print(
        f"raw TPM2_Sign ES256 on {tcti}: n={n} p50={lat[n // 2] * 1e6:.0f} µs "
        f"p99={lat[min(n - 1, int(n * 0.99))] * 1e6:.0f} µs ops/s={n / sum(lat):.0f}"
    )
