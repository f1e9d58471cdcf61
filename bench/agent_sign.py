"""Agent benchmarks (issue 9, "Speed"): a WPT signed over the agent's socket, per custody
tier, with 1 and 8 concurrent clients; the agent's RSS with 100 workload identities; the
time from an entry created to its workload served.

The limits are measured in the same run: the bare round trip on the same socket
(``Ping``: no attestation, no key) and the device signing of the same WPT in-process
(``create_wpt`` with a key of the same tier, i.e. joserfc + the store's sign call). What
is left is the agent's own work (caller attestation, lookup, request parsing)::

    overhead = (p50(SignWPT) - p50(Ping) - p50(device)) / (p50(Ping) + p50(device))

aim <= 30 %. The agent is a ``custos agent run`` subprocess, the server another
(bench/agent_common.py); the clients are ``custos.client.WorkloadClient`` (grpc.aio) in
this process, 8 clients = 8 channels driven by 8 tasks. Nothing here asserts on time.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from pathlib import Path

from timing import Result, measure, row, timed_async

ORIGIN = "https://api.bench.example"
CLIENTS = 8
IDENTITIES = 100


def device_rows(tiers: Mapping[str, Mapping[str, str]], base: Path, n: int) -> dict[str, Result]:
    """In-process: the WPT signed with a key of each tier (before the agent opens the
    devices). ``create_wpt`` is what the agent calls; the WIT is minted locally."""
    from custos.identity import SpiffeId
    from custos.keys import MemoryKeyStore
    from custos.keys.config import KeyStoreConfig, open_key_store
    from custos.keys.jose import joserfc_key
    from custos.wimse.wit import mint_wit
    from custos.wimse.wpt import create_wpt

    ca = MemoryKeyStore()
    ca.create("ca", "ES256")
    out: dict[str, Result] = {}
    for tier, table in tiers.items():
        store = open_key_store(KeyStoreConfig(store=tier, **table))  # type: ignore[arg-type]
        try:
            store.create("bench-device", "ES256")
            wit = mint_wit(
                joserfc_key(ca.get("ca")),
                "ES256",
                "ca",
                SpiffeId.parse("spiffe://bench.example/device"),
                store.public_jwk("bench-device"),
                timedelta(hours=1),
            )
            key = joserfc_key(store.get("bench-device"))
            out[tier] = measure(
                f"in-process create_wpt, {tier} key",
                lambda key=key, wit=wit: create_wpt(key, wit, f"{ORIGIN}/pay"),  # type: ignore[misc]
                n if tier != "tpm" else max(50, n // 10),
            )
            store.delete("bench-device")
        finally:
            store.close()
    return out


#: The agent's pid, for its CPU time per call (set by bench_agent_rows).
AGENT_PID = [0]


async def concurrent(
    make: Callable[[], Callable[[], Awaitable[object]]], clients: int, n_each: int
) -> tuple[list[float], float]:
    """``clients`` tasks, each with its own client, ``n_each`` calls; (latencies, wall s).
    Also prints the agent's own CPU time per call in that run (where the time goes)."""
    from agent_common import cpu_seconds

    calls = [make() for _ in range(clients)]
    for call in calls:
        for _ in range(10):
            await call()
    latencies: list[list[float]] = []
    cpu0 = cpu_seconds(AGENT_PID[0])
    t0 = time.perf_counter()
    latencies = await asyncio.gather(*(timed_async(call, n_each, warmup=0) for call in calls))
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(AGENT_PID[0]) - cpu0
    done = clients * n_each
    LAST_CPU[0] = (cpu / done, cpu / wall)
    return [x for each in latencies for x in each], wall


#: (agent CPU seconds per call, cores busy) of the last concurrent run.
LAST_CPU = [(0.0, 0.0)]


def cpu_note() -> str:
    per_call, cores = LAST_CPU[0]
    return f"; agent CPU {per_call * 1e6:.0f} µs/call, {cores:.2f} cores"


def overhead(sign: Result, ping: Result, device: Result) -> str:
    limit = ping.p50 + device.p50
    return f"agent beyond Ping+device: {100 * (sign.p50 - limit) / limit:+.0f}% (aim <= 30%)"


def wall_row(label: str, latencies: list[float], wall: float, note: str = "") -> Result:
    """A concurrent case: ops/s is the wall-clock throughput of all clients together."""
    r = Result(label, latencies)
    text = row(r, note=note)
    ops = f"{len(latencies) / wall:>10.0f}"
    print(text[:53] + ops + text[63:])
    return r


async def socket_rows(
    socket: str, ids: Mapping[str, str], device: Mapping[str, Result], n: int
) -> None:
    from custos.client import WorkloadClient

    clients: list[WorkloadClient] = []

    def client() -> WorkloadClient:
        c = WorkloadClient(socket)
        clients.append(c)
        return c

    def ping_call() -> Callable[[], Awaitable[object]]:
        return client().ping

    def sign_call(spiffe_id: str) -> Callable[[], Callable[[], Awaitable[object]]]:
        def make() -> Callable[[], Awaitable[object]]:
            c = client()
            return lambda: c.sign_wpt(f"{ORIGIN}/pay", spiffe_id=spiffe_id)

        return make

    try:
        ping1 = Result(
            "Ping over the socket, 1 client (bare round trip)", await timed_async(ping_call(), n)
        )
        print(row(ping1))
        lat, wall = await concurrent(ping_call, CLIENTS, n // CLIENTS)
        ping8 = wall_row(
            f"Ping over the socket, {CLIENTS} clients",
            lat,
            wall,
            "ops/s = all clients" + cpu_note(),
        )
        # The gate without a key: caller credentials, rate limit, the per-connection
        # attestation cache, the entitled identities' lookup; no signing.
        fetch_client = client()
        fetch = Result(
            "FetchWIT memory, 1 client (gate + lookup, no key)",
            await timed_async(lambda: fetch_client.fetch_wit(ids["memory"]), n),
        )
        print(row(fetch, ping1, note="ratio vs Ping"))
        for tier, spiffe_id in ids.items():
            runs = n if tier != "tpm" else max(50, n // 10)
            print(row(device[tier]))
            signed = await timed_async(sign_call(spiffe_id)(), runs)
            one = Result(f"SignWPT {tier}, 1 client", signed)
            print(row(one, device[tier], note=overhead(one, ping1, device[tier])))
            lat, wall = await concurrent(sign_call(spiffe_id), CLIENTS, runs // CLIENTS)
            eight = Result("", lat)
            aim = " (aim >= 2,000/s)" if tier == "memory" else ""
            wall_row(
                f"SignWPT {tier}, {CLIENTS} clients",
                lat,
                wall,
                f"{len(lat) / wall:,.0f} signs/s{aim}; {overhead(eight, ping8, device[tier])}"
                + cpu_note(),
            )
    finally:
        for c in clients:
            await c.close()


async def served_after_create(
    admin_socket: Path, socket: str, parent: str, selector: str, count: int
) -> list[float]:
    """Seconds from ``create_entry`` called to the new identity's WIT served on the socket
    (polled every 5 ms by the workload: resolution ±5 ms)."""
    from custos._proto import types_v1_pb2
    from custos.client import WorkloadApiError, WorkloadClient
    from custos.server.admin.client import AdminClient

    out = []
    async with AdminClient(admin_socket) as admin, WorkloadClient(socket) as c:
        for i in range(count):
            spiffe_id = f"spiffe://bench.example/served/{i}"
            t0 = time.perf_counter()
            await admin.create_entry(
                types_v1_pb2.Entry(
                    spiffe_id=spiffe_id,
                    parent_id=parent,
                    selectors=[selector],
                    key_custody="memory",
                    x509_svid_ttl=3600,
                    wit_ttl=3600,
                )
            )
            while True:
                try:
                    await c.fetch_wit(spiffe_id)
                    break
                except WorkloadApiError:
                    await asyncio.sleep(0.005)
            out.append(time.perf_counter() - t0)
    return out


async def fill_to(admin_socket: Path, socket: str, parent: str, selector: str, total: int) -> None:
    """Entries ``/rss/<i>`` until the node has ``total`` identities, all served."""
    from custos._proto import types_v1_pb2
    from custos.client import WorkloadApiError, WorkloadClient
    from custos.server.admin.client import AdminClient

    async with AdminClient(admin_socket) as admin, WorkloadClient(socket) as c:
        have = len(await admin.list_entries(parent_id=parent))
        made = [f"spiffe://bench.example/rss/{i}" for i in range(total - have)]
        for spiffe_id in made:
            await admin.create_entry(
                types_v1_pb2.Entry(
                    spiffe_id=spiffe_id, parent_id=parent, selectors=[selector],
                    key_custody="memory", x509_svid_ttl=3600, wit_ttl=3600,
                )
            )  # fmt: skip
        deadline = time.monotonic() + 120
        for spiffe_id in made:
            while True:
                try:
                    await c.fetch_wit(spiffe_id)
                    break
                except WorkloadApiError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.05)
        for _ in range(500):  # warm-up: the signing path's allocations made
            await c.sign_wpt(f"{ORIGIN}/pay")


def imports_rss_mib(statement: str) -> float:
    """VmRSS of a fresh interpreter after ``statement``: what imports alone cost."""
    import subprocess
    import sys

    code = (
        f"{statement}\n"
        "import re\n"
        "print(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()).group(1))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 1024


def bench_agent_rows(section: Callable[[str], None], tpm_tcti: str, hsm: object) -> None:
    """``make bench`` rows for the agent (run.py calls this)."""
    from agent_common import agent_process, agent_toml, short_dir, uid_selector, vm_rss_mib
    from server_common import env_int, server_processes

    from custos._proto import types_v1_pb2
    from custos.server.admin.client import AdminClient

    n = env_int("BENCH_AGENT_N", 2000)
    print(f"\n(load average at the start of the agent rows: {os.getloadavg()[0]:.1f})")
    with short_dir() as base, server_processes() as [(rig, _)]:
        tiers: dict[str, dict[str, str]] = {
            "memory": {},
            "pkcs11": {"pkcs11_module": hsm.module, "pkcs11_uri": hsm.uri},  # type: ignore[attr-defined]
            "tpm": {"tcti": tpm_tcti, "key_dir": str(base / "tpm-keys")},
        }
        device = device_rows(tiers, base, n)
        config = asyncio.run(agent_toml(rig, base, tiers))
        with agent_process(config) as (process, socket, agent_id):
            rss_empty = vm_rss_mib(process.pid)
            AGENT_PID[0] = process.pid
            selector = uid_selector()

            async def entries() -> dict[str, str]:
                ids = {}
                async with AdminClient(rig.admin_socket) as admin:
                    for tier in tiers:
                        ids[tier] = f"spiffe://bench.example/sign/{tier}"
                        await admin.create_entry(
                            types_v1_pb2.Entry(
                                spiffe_id=ids[tier], parent_id=agent_id, selectors=[selector],
                                key_custody=tier, x509_svid_ttl=3600, wit_ttl=3600,
                            )
                        )  # fmt: skip
                return ids

            async def drive() -> tuple[list[float], float]:
                ids = await entries()
                from custos.client import WorkloadApiError, WorkloadClient

                async with WorkloadClient(socket) as c:
                    for spiffe_id in ids.values():
                        for _ in range(2000):
                            try:
                                await c.fetch_wit(spiffe_id)
                                break
                            except WorkloadApiError:
                                await asyncio.sleep(0.05)
                section(
                    "Agent: a WPT signed over the socket (SignWPT), per custody tier "
                    "(ratio = p50 / in-process create_wpt with a key of the tier)"
                )
                await socket_rows(socket, ids, device, n)
                served = await served_after_create(
                    rig.admin_socket, socket, agent_id, selector, env_int("BENCH_AGENT_ENTRIES", 20)
                )
                await fill_to(rig.admin_socket, socket, agent_id, selector, IDENTITIES)
                return served, vm_rss_mib(process.pid)

            served, rss = asyncio.run(drive())
        section("Agent: entry created -> its workload served (aim p50/p99 < 1 s)")
        r = Result("create_entry -> WIT served on the socket (5 ms poll)", served)
        print(row(r, note=f"p50 {r.p50 * 1e3:.0f} ms, p99 {r.p99 * 1e3:.0f} ms"))
        print(
            f"\nAgent RSS (custos agent run, VmRSS): {rss_empty:.1f} MiB after start, "
            f"{rss:.1f} MiB with {IDENTITIES} workload identities after warm-up (aim <= 80 MiB)"
        )
        # Where it goes: the interpreter and the modules the agent imports, before any work.
        print(
            f"  of which: bare interpreter {imports_rss_mib('pass'):.1f} MiB; "
            f"after 'import custos.agent.app' {imports_rss_mib('import custos.agent.app'):.1f} "
            f"MiB; + tpm2_pytss and python-pkcs11 (tiers) "
            f"{imports_rss_mib('import custos.agent.app, tpm2_pytss, pkcs11'):.1f} MiB"
        )
