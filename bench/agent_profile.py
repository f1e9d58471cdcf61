"""Profile ``custos agent run`` under the 8-client WPT signing load (issue 9).

Not a benchmark row: a tool for finding where the agent's per-call time goes. The
agent runs under ``cProfile`` (``python -m cProfile -o <file> -m custos agent run``,
the same code path as ``bench/agent_sign.py``'s agent; ``BENCH_AGENT_PROFILE_TIER``
``memory`` (default) or ``pkcs11``, a SoftHSM token made here); 8
``WorkloadClient``s in this process sign ``BENCH_AGENT_PROFILE_N`` WPTs (default
8000) between them; the agent is stopped with SIGTERM, which writes the profile.

    .venv/bin/python bench/agent_profile.py [out.prof]   # then pstats / snakeviz

Profiled times are inflated; read the relative shares.
"""

from __future__ import annotations

import asyncio
import os
import pstats
import sys
from pathlib import Path

from agent_common import agent_process, agent_toml, short_dir, uid_selector
from agent_sign import CLIENTS, ORIGIN
from server_common import env_int, server_processes


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/custos-agent.prof").resolve()
    n = env_int("BENCH_AGENT_PROFILE_N", 8000)
    from custos._proto import types_v1_pb2
    from custos.client import WorkloadApiError, WorkloadClient
    from custos.server.admin.client import AdminClient

    tier = os.environ.get("BENCH_AGENT_PROFILE_TIER", "memory")
    with short_dir() as base, server_processes() as [(rig, _)]:
        table: dict[str, str] = {}
        if tier == "pkcs11":
            from custos.testing import softhsm

            conf = softhsm.write_config(base / "softhsm")
            os.environ["SOFTHSM2_CONF"] = str(conf)  # the agent inherits it
            hsm = softhsm.init_token(softhsm.find_module(), conf, "bench")
            table = {"pkcs11_module": hsm.module, "pkcs11_uri": hsm.uri}
        elif tier != "memory":
            raise SystemExit(f"BENCH_AGENT_PROFILE_TIER: memory or pkcs11, not {tier!r}")
        config = asyncio.run(agent_toml(rig, base, {"memory": {}, tier: table}))
        with agent_process(config, profile=out) as (_, socket, agent_id):

            async def drive() -> None:
                spiffe_id = f"spiffe://bench.example/sign/{tier}"
                async with AdminClient(rig.admin_socket) as admin:
                    await admin.create_entry(
                        types_v1_pb2.Entry(
                            spiffe_id=spiffe_id, parent_id=agent_id, selectors=[uid_selector()],
                            key_custody=tier, x509_svid_ttl=3600, wit_ttl=3600,
                        )
                    )  # fmt: skip
                clients = [WorkloadClient(socket) for _ in range(CLIENTS)]
                try:
                    for _ in range(2000):
                        try:
                            await clients[0].fetch_wit(spiffe_id)
                            break
                        except WorkloadApiError:
                            await asyncio.sleep(0.05)

                    async def each(c: WorkloadClient) -> None:
                        for _ in range(n // CLIENTS):
                            await c.sign_wpt(f"{ORIGIN}/pay", spiffe_id=spiffe_id)

                    await asyncio.gather(*(each(c) for c in clients))
                finally:
                    for c in clients:
                        await c.close()

            asyncio.run(drive())
    stats = pstats.Stats(str(out))
    stats.sort_stats("tottime").print_stats(40)
    stats.sort_stats("cumulative").print_stats(60)


if __name__ == "__main__":
    main()
