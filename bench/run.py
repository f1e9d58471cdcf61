"""`make bench`: custos against the in-process and raw-device limits, measured in the same run.

Prints ops/s, p50 and p99 per case and the ratio of p50 against the named baseline.
Figures from a run go into docs/benchmarks.md. Nothing here asserts on time.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TSS2_LOG", "esys+none,tcti+none")

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from timing import Result, header, measure, row

N_FAST = int(os.environ.get("BENCH_N", "3000"))
N_TPM = int(os.environ.get("BENCH_N_TPM", "1000"))


def section(title: str) -> None:
    print(f"\n### {title}\n")
    print(header())


def bench_keystores(tpm_tcti: str, key_dir: Path, hsm: object) -> None:
    from raw_pkcs11 import bench_pkcs11_rows
    from raw_tpm import bench_tpm_rows

    from custos.keys import ExportableKeyStore, KeyStore, MemoryKeyStore

    msg = b"x" * 256
    section("Key stores: single-threaded ES256 sign (ratio = p50 / raw call on the same device)")
    key = ec.generate_private_key(ec.SECP256R1())
    inproc = measure(
        "in-process cryptography ECDSA P-256",
        lambda: key.sign(msg, ec.ECDSA(hashes.SHA256())),
        N_FAST,
    )
    print(row(inproc))

    software: list[tuple[str, KeyStore]] = [
        ("custos memory store", MemoryKeyStore()),
        ("custos exportable store (key on disk)", ExportableKeyStore(key_dir / "exportable")),
    ]
    for label, store in software:
        store.create("b", "ES256")
        print(
            row(
                measure(label, functools.partial(store.sign, "b", msg), N_FAST),
                inproc,
                note="vs in-process",
            )
        )
        store.delete("b")
        store.close()

    bench_pkcs11_rows(hsm, msg, N_FAST)  # raw C_Sign vs the store, in alternating rounds
    bench_tpm_rows(tpm_tcti, key_dir, msg, N_TPM)


def bench_wimse(tpm_tcti: str, key_dir: Path, hsm: object) -> None:
    from joserfc import jwt as jose_jwt
    from joserfc.jwk import ECKey

    from custos.bundle import BundleSet, JwtAuthority, TrustBundle
    from custos.identity import SpiffeId, TrustDomain
    from custos.integrations.asgi import WimseASGIMiddleware
    from custos.keys import MemoryKeyStore
    from custos.keys.jose import joserfc_key
    from custos.keys.pkcs11 import Pkcs11KeyStore
    from custos.keys.tpm import TpmKeyStore
    from custos.wimse.replay import MemoryReplayCache
    from custos.wimse.verifier import RequestVerifier
    from custos.wimse.wit import WitVerifier, mint_wit
    from custos.wimse.wpt import WptVerifier, create_wpt, wpt_headers

    td = TrustDomain.parse("bench.example")
    issuer = MemoryKeyStore()
    issuer.create("ca", "ES256")
    ca_jwk = issuer.public_jwk("ca")
    bundles = BundleSet(
        [
            TrustBundle(
                td, (), (JwtAuthority(ca_jwk["kid"], issuer.public_key("ca"), None, "ES256"),)
            )
        ]
    )
    workload = MemoryKeyStore()
    workload.create("w", "ES256")
    wkey = joserfc_key(workload.get("w"))
    wit = mint_wit(
        joserfc_key(issuer.get("ca")),
        "ES256",
        ca_jwk["kid"],
        SpiffeId.parse("spiffe://bench.example/w"),
        workload.public_jwk("w"),
        timedelta(hours=1),
    )
    origin = "https://api.bench.example"

    # Raw limit: cryptography verify of one ES256 signature (and two: WIT + WPT)
    key = ec.generate_private_key(ec.SECP256R1())
    msg = b"y" * 300
    sig = key.sign(msg, ec.ECDSA(hashes.SHA256()))
    pub = key.public_key()
    one = measure(
        "raw cryptography ES256 verify x1 (tight loop)",
        lambda: pub.verify(sig, msg, ec.ECDSA(hashes.SHA256())),
        N_FAST,
    )

    def two_verifies() -> None:
        pub.verify(sig, msg, ec.ECDSA(hashes.SHA256()))
        pub.verify(sig, msg, ec.ECDSA(hashes.SHA256()))

    two = measure("raw cryptography ES256 verify x2 (tight loop)", two_verifies, N_FAST)

    def middleware_case(
        label: str, cache_entries: int, raw: Callable[[], None], raw_label: str
    ) -> tuple[Result, Result]:
        """The middleware's latency per request and, timed right after each
        request in the same loop, the raw verify(s) it is compared with: both
        see the same load and the same cache state (interleaved, as the key
        store rows alternate their rounds)."""
        wits = WitVerifier(bundles, max_entries=cache_entries)
        verifier = RequestVerifier(
            wpt=WptVerifier(wit_verifier=wits, audiences=[origin], replay=MemoryReplayCache())
        )

        async def ok_app(scope, receive, send):  # type: ignore[no-untyped-def]
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        # in-memory replay cache: no blocking I/O, so verify on the event loop
        mw = WimseASGIMiddleware(ok_app, verifier, verify_in_thread=False)
        n = N_FAST
        scopes = []
        for _ in range(n + 20):  # a fresh proof per request (replay protection is on); 20 warm up
            headers = wpt_headers(wit, create_wpt(wkey, wit, f"{origin}/pay"))
            scopes.append(
                {
                    "type": "http",
                    "method": "POST",
                    "path": "/pay",
                    "raw_path": b"/pay",
                    "query_string": b"",
                    "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
                }
            )
        statuses: list[int] = []

        async def receive():  # type: ignore[no-untyped-def]
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):  # type: ignore[no-untyped-def]
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        async def drive() -> list[float]:
            # All requests inside one running event loop, each await timed on
            # its own: a server calls the middleware from a running loop, and
            # one run_until_complete per request would time the loop's
            # start-up and task creation (tens of µs) as if it were ours.
            clock = time.perf_counter
            out: list[float] = []
            for i, scope in enumerate(scopes):
                t0 = clock()
                await mw(scope, receive, send)
                t1 = clock()
                raw()
                t2 = clock()
                if i >= warmup:
                    out.append(t1 - t0)
                    raw_out.append(t2 - t1)
            return out

        warmup = 20
        raw_out: list[float] = []
        loop = asyncio.new_event_loop()
        try:
            result = Result(label, loop.run_until_complete(drive()))
        finally:
            loop.close()
        assert set(statuses) == {204}, f"bench requests failed: {set(statuses)}"
        assert result.n == n
        return result, Result(raw_label, raw_out)

    section("Relying party: WIT+WPT verification per request through the ASGI middleware")
    # The tight-loop raw figures, for reference; the ratios use the
    # interleaved ones measured next to each request.
    print(row(two))
    print(row(one))
    for _ in range(int(os.environ.get("BENCH_RP_ROUNDS", "2"))):
        mw_each, raw_two = middleware_case(
            "ASGI middleware, WIT verified every request",
            0,
            two_verifies,
            "raw cryptography ES256 verify x2 (interleaved)",
        )
        print(row(raw_two))
        print(row(mw_each, raw_two, note="aim <= 1.5x of 2 raw verifies"))
        mw_cached, raw_one = middleware_case(
            "ASGI middleware, verified WIT cached (by token)",
            4096,
            lambda: pub.verify(sig, msg, ec.ECDSA(hashes.SHA256())),
            "raw cryptography ES256 verify x1 (interleaved)",
        )
        print(row(raw_one))
        print(row(mw_cached, raw_one, note="aim <= 1.3x of 1 raw verify"))
    if os.environ.get("BENCH_ONLY") == "rp":  # the relying-party rows alone
        return

    section("Workload side: WPT creation (ratio = p50 / joserfc in-process ES256)")
    plain = ECKey.generate_key("P-256")
    claims = {"aud": f"{origin}/pay", "exp": 2_000_000_000, "jti": "x" * 22, "wth": "y" * 43}
    base = measure(
        "joserfc in-process ES256 JWT encode",
        lambda: jose_jwt.encode({"alg": "ES256", "typ": "wpt+jwt"}, claims, plain),
        N_FAST,
    )
    print(row(base))
    print(
        row(
            measure(
                "create_wpt via memory store key",
                lambda: create_wpt(wkey, wit, f"{origin}/pay"),
                N_FAST,
            ),
            base,
        )
    )

    hstore = Pkcs11KeyStore(module=hsm.module, uri=hsm.uri)  # type: ignore[attr-defined]
    hstore.create("wpt", "ES256")
    hwit = mint_wit(
        joserfc_key(issuer.get("ca")),
        "ES256",
        ca_jwk["kid"],
        SpiffeId.parse("spiffe://bench.example/h"),
        hstore.public_jwk("wpt"),
        timedelta(hours=1),
    )
    hkey = joserfc_key(hstore.get("wpt"))
    print(
        row(
            measure(
                "create_wpt via SoftHSM key",
                lambda: create_wpt(hkey, hwit, f"{origin}/pay"),
                N_FAST,
            ),
            base,
        )
    )
    hstore.delete("wpt")
    hstore.close()

    tstore = TpmKeyStore(tcti=tpm_tcti, key_dir=key_dir)
    tstore.create("wpt", "ES256")
    twit = mint_wit(
        joserfc_key(issuer.get("ca")),
        "ES256",
        ca_jwk["kid"],
        SpiffeId.parse("spiffe://bench.example/t"),
        tstore.public_jwk("wpt"),
        timedelta(hours=1),
    )
    tkey = joserfc_key(tstore.get("wpt"))
    print(
        row(
            measure(
                "create_wpt via swtpm key", lambda: create_wpt(tkey, twit, f"{origin}/pay"), N_TPM
            ),
            base,
        )
    )
    tstore.close()


def bench_preauth() -> None:
    """Work before authentication (issue 7 item 8): each header an
    unauthenticated caller controls, at its size cap, in its worst shape,
    through the whole verify_request up to the refusal. Aim: <= 5 ms each."""
    from custos.bundle import BundleSet, JwtAuthority, TrustBundle
    from custos.identity import SpiffeId, TrustDomain
    from custos.keys import MemoryKeyStore
    from custos.keys.jose import joserfc_key
    from custos.wimse.digest import MAX_DIGEST_TOKENS, verify_content_digest
    from custos.wimse.errors import WimseError
    from custos.wimse.http.message import HttpMessage
    from custos.wimse.httpsig import (
        MAX_FIELD_BYTES,
        MAX_FIELD_TOKENS,
        HttpSignatureVerifier,
        sign_request,
    )
    from custos.wimse.replay import MemoryReplayCache
    from custos.wimse.wit import MAX_TOKEN_BYTES, WitVerifier, mint_wit

    keys = MemoryKeyStore()
    keys.create("ca", "ES256")
    keys.create("w", "ES256")
    td = TrustDomain.parse("bench.example")
    bundles = BundleSet(
        [TrustBundle(td, (), (JwtAuthority("ca-1", keys.public_key("ca"), None, "ES256"),))]
    )
    wit = mint_wit(
        joserfc_key(keys.get("ca")),
        "ES256",
        "ca-1",
        SpiffeId.parse("spiffe://bench.example/w"),
        keys.public_jwk("w"),
        timedelta(hours=1),
    )
    origin = "https://api.bench.example"
    verifier = HttpSignatureVerifier(WitVerifier(bundles), MemoryReplayCache(), [origin])
    body = b'{"x": 1}'
    signed = sign_request(
        HttpMessage.request("POST", "/pay", [("Content-Type", "application/json")], body),
        signer=keys.get("w"),
        wit=wit,
        audience=f"{origin}/pay",
    )

    def fill(make: Callable[[int], str], per_unit: int, cap: int, head: str = "") -> str:
        """The worst shape under both caps: as many units as the token cap
        allows (``per_unit`` separators each), each as long as the byte cap
        allows; ``make(n)`` is a unit of length n."""
        units = (MAX_FIELD_TOKENS - 8) // per_unit
        size = (cap - len(head) - 8) // units
        return head + "".join(make(size) for _ in range(units))

    def refused(headers: dict[str, str]) -> Callable[[], None]:
        message = HttpMessage.request(
            "POST", "/pay", [(k, headers.get(k, v)) for k, v in signed.headers], body
        )

        def run() -> None:
            try:
                verifier.verify_request(message)
            except WimseError as e:
                # Refused after the parse, not by the size/token scans.
                assert "tokens" not in e.message, e.message
                return
            raise AssertionError("a worst-case header was accepted")

        return run

    cases = {
        "Signature-Input, one list of many items": {
            "Signature-Input": fill(
                lambda n: '"' + "a" * (n - 3) + '" ', 1, MAX_FIELD_BYTES, "wimse=("
            )
            + ")"
        },
        "Signature-Input, many members": {
            "Signature-Input": fill(lambda n: "a" * (n - 5) + "=(), ", 3, MAX_FIELD_BYTES)[:-2]
        },
        "Signature-Input, many parameters": {
            "Signature-Input": fill(
                lambda n: ";p" + "a" * (n - 4) + "=1", 1, MAX_FIELD_BYTES, "wimse=()"
            )
        },
        "Signature, many members": {
            "Signature": fill(lambda n: "a" * (n - 10) + "=:AAAA:, ", 2, MAX_FIELD_BYTES)[:-2]
        },
        "Workload-Identity-Token 8 KB": {"Workload-Identity-Token": "e" * MAX_TOKEN_BYTES},
    }
    section("Work before authentication: worst header at its cap (aim <= 5 ms p99 each)")
    for label, headers in cases.items():
        r = measure(f"httpsig refuses: {label}", refused(headers), 300)
        print(row(r, note=f"p99 {r.p99 * 1e3:.2f} ms"))
    digest = ", ".join(["a" * 40 + "=:AAAA:"] * (MAX_DIGEST_TOKENS // 2 - 1))

    def digest_case() -> None:
        try:
            verify_content_digest(digest, body)
        except WimseError:
            return

    r = measure("Content-Digest at its caps (parse only)", digest_case, 300)
    print(row(r, note=f"p99 {r.p99 * 1e3:.2f} ms"))


def bench_server() -> None:
    """Issue 8: the server against its in-process limits (bench/server_*.py)."""
    from server_entries import bench_entries_rows
    from server_issuance import bench_issuance_rows

    bench_issuance_rows(section)
    bench_entries_rows(section)


def bench_agent(tpm_tcti: str, hsm: object) -> None:
    """Issue 9: the agent's socket against its in-process limits (bench/agent_*.py)."""
    from agent_sign import bench_agent_rows

    bench_agent_rows(section, tpm_tcti, hsm)


def bench_tpm_attestation(tpm_tcti: str, ca_files: list[Path], base: Path) -> None:
    """Issue 10: TPM node attestation and re-attestation (bench/tpm_attest.py)."""
    from tpm_attest import bench_tpm_attestation_rows

    bench_tpm_attestation_rows(section, tpm_tcti, ca_files, base)


def bench_workload_attestation() -> None:
    """Issue 11: k8s and systemd callers vs the unix attestor alone (bench/attest_workload.py)."""
    from attest_workload import bench_workload_rows

    bench_workload_rows(section)


def bench_cloud_attestation() -> None:
    """Issue 11: aws_iid and gcp_iit server-side verification vs the raw RSA verify
    (bench/attest_cloud.py)."""
    from attest_cloud import bench_cloud_attestation_rows

    bench_cloud_attestation_rows(section)


def bench_k8s_azure_attestation() -> None:
    """Issue 11: azure_msi verification vs the raw RSA verify; k8s_psat p50/p99 against a
    local API server (bench/attest_k8s_azure.py)."""
    from attest_k8s_azure import bench_k8s_azure_rows

    bench_k8s_azure_rows(section)


def bench_docker_attestation() -> None:
    """Issue 11: a docker caller vs the unix attestor alone (bench/attest_docker.py)."""
    from attest_docker import bench_docker_rows

    bench_docker_rows(section)


def main() -> int:
    if os.environ.get("BENCH_ONLY") == "docker":  # docker workload attestation alone
        bench_docker_attestation()
        return 0
    if os.environ.get("BENCH_ONLY") == "workload":  # workload attestation alone (no TPM/HSM)
        bench_workload_attestation()
        return 0
    if os.environ.get("BENCH_ONLY") == "cloud-attest":  # aws_iid, gcp_iit alone (no TPM/HSM)
        bench_cloud_attestation()
        return 0
    if os.environ.get("BENCH_ONLY") == "k8s-azure":  # azure_msi, k8s_psat alone (no TPM/HSM)
        bench_k8s_azure_attestation()
        return 0
    from custos.testing import softhsm as hsm_rig
    from custos.testing import swtpm as tpm_rig

    with tempfile.TemporaryDirectory(prefix="custos-bench-") as tmp:
        root = Path(tmp)
        state = tpm_rig.provision(root / "tpm")
        tpm = tpm_rig.start_instance(state.root)
        conf = hsm_rig.write_config(root / "softhsm")
        os.environ["SOFTHSM2_CONF"] = str(conf)
        hsm = hsm_rig.init_token(hsm_rig.find_module(), conf, "bench")
        try:
            print(f"custos benchmarks — python {sys.version.split()[0]}, {os.cpu_count()} cores")
            if os.environ.get("BENCH_ONLY") == "pkcs11":  # the PKCS#11 rows alone
                from raw_pkcs11 import bench_pkcs11_rows

                section("Key stores: PKCS#11 ES256 sign (ratio = p50 / raw call)")
                bench_pkcs11_rows(hsm, b"x" * 256, N_FAST)
                return 0
            if os.environ.get("BENCH_ONLY") == "tpm":  # the TPM store rows alone
                from raw_tpm import bench_tpm_rows

                section("Key stores: TPM ES256 sign (ratio = p50 / raw call)")
                bench_tpm_rows(tpm.tcti, root / "tpm-keys", b"x" * 256, N_TPM)
                return 0
            if os.environ.get("BENCH_ONLY") == "rp":  # the relying-party rows alone
                bench_wimse(tpm.tcti, root / "tpm-keys2", hsm)
                return 0
            if os.environ.get("BENCH_ONLY") == "server":  # the server rows alone
                bench_server()
                return 0
            if os.environ.get("BENCH_ONLY") == "agent":  # the agent rows alone
                bench_agent(tpm.tcti, hsm)
                return 0
            if os.environ.get("BENCH_ONLY") == "tpm-attest":  # TPM node attestation alone
                bench_tpm_attestation(tpm.tcti, list(state.ek_ca_certs), root / "attest")
                return 0
            bench_keystores(tpm.tcti, root / "tpm-keys", hsm)
            bench_wimse(tpm.tcti, root / "tpm-keys2", hsm)
            bench_preauth()
            bench_server()
            bench_agent(tpm.tcti, hsm)
            bench_tpm_attestation(tpm.tcti, list(state.ek_ca_certs), root / "attest")
            bench_workload_attestation()
            bench_docker_attestation()
            bench_cloud_attestation()
            bench_k8s_azure_attestation()
        finally:
            tpm.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
