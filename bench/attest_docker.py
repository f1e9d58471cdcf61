"""Workload attestation of a Docker caller (issue 11, "Speed"): the ``docker`` attestor
with the container lookup cached, next to the ``unix`` attestor alone (the limit: aim
p50 <= 2 ms over it), in the same run, on a real process in a real container of the
local test image (src/custos/testing/docker.py), against the real Docker engine.

Rows (all through the agent's catalog, ``attest_workload``, one event loop):

- limit: ``unix`` alone (the container's process as the caller);
- ``unix`` + ``docker``, container lookup cached (the steady state: one
  ``GET /containers/<id>/json`` per ``cache_ttl``);
- ``unix`` + ``docker``, no cache (``cache_ttl = 0``: an Engine API call per
  attestation, for scale).

ratio = p50 / the limit's p50; the note gives the p50 difference.  Nothing here
asserts on time.  Needs a running engine (``make docker-up``); without one the rows
are skipped with a note.

    python bench/attest_docker.py          (or BENCH_ONLY=docker python bench/run.py)
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from attest_common import catalog, over, print_section, timed, unix_limit
from timing import row

N = int(os.environ.get("BENCH_N_DOCKER", "2000"))
N_UNCACHED = int(os.environ.get("BENCH_N_DOCKER_UNCACHED", "300"))


def bench_docker_rows(section: Callable[[str], None]) -> None:
    from custos.plugin import PeerCredentials, PluginConfig
    from custos.testing.docker import engine_answers, ensure_image

    if not engine_answers():
        print("(docker workload attestation rows need a Docker engine: make docker-up)")
        return
    tag = ensure_image().tag
    labels = [f"--label=bench.l{i}=v{i}" for i in range(8)]
    cid = subprocess.run(
        ["docker", "run", "-d", "--rm", *labels, "-e", "REGION=eu-1", tag, "sleep", "900"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    try:
        inspect = subprocess.run(
            ["docker", "inspect", "-f", "{{.State.Pid}}", cid],
            capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
        pid = int(inspect.stdout)
        fd = os.pidfd_open(pid)
        try:
            peer = PeerCredentials(pid=pid, uid=0, gid=0, pidfd=fd)
            section("Workload attestation: docker caller (ratio = p50 / unix attestor alone)")
            limit = unix_limit(peer, N)
            print(row(limit, limit))
            cached = {"cache_ttl": 3600, "env_allowlist": ["REGION"]}
            with catalog(PluginConfig("docker", cached)) as cat:
                got = asyncio.run(cat.attest_workload(peer))
                assert any(s.value == "label:bench.l0:v0" for s in got), got
                r = timed(
                    "unix + docker, container lookup cached",
                    lambda: cat.attest_workload(peer),
                    N,
                )
            print(row(r, limit, note=over(r, limit, "aim <= 2")))
            with catalog(PluginConfig("docker", {**cached, "cache_ttl": 0})) as cat:
                r = timed(
                    "unix + docker, Engine API per call (no cache)",
                    lambda: cat.attest_workload(peer),
                    N_UNCACHED,
                    warmup=10,
                )
            print(row(r, limit, note=over(r, limit)))
        finally:
            os.close(fd)
    finally:
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True, timeout=60)


if __name__ == "__main__":
    bench_docker_rows(print_section)
