"""What the agent benchmarks share: a ``custos server run`` process (bench/server_common.py)
and a ``custos agent run`` process attested to it with a join token, configured as an
operator would (agent.toml, the server's roots from the admin API).

Both are subprocesses: the agent has its own interpreter (its own GIL), as on a node, and
its RSS is its own. The benchmark process is the workloads' side (``custos.client``).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from custos.agent.client.streams import bundle_from_proto
from custos.identity import TrustDomain
from custos.server.admin.client import AdminClient
from custos.testing.server import ServerRig

#: The whole agent start (attestation included) and every wait are bounded by this.
START_SECONDS = 60.0


def custody_toml(tiers: Mapping[str, Mapping[str, str]]) -> str:
    out = []
    for tier, table in tiers.items():
        out.append(f"[custody.{tier}]")
        out.extend(f'{k} = "{v}"' for k, v in table.items())
    return "\n".join(out)


async def agent_toml(rig: ServerRig, base: Path, tiers: Mapping[str, Mapping[str, str]]) -> Path:
    """agent.toml for ``rig``'s server: a fresh join token, its roots as a bundle file,
    the unix workload attestor, the given custody tiers; the per-uid request rate lifted
    (the default 200/s would cap the benchmark, not the agent)."""
    td = TrustDomain.parse(rig.trust_domain)
    async with AdminClient(rig.admin_socket) as admin:
        bundle = bundle_from_proto(await admin.get_bundle(), td)
        token = await admin.generate_token()
    bundle.save(base / "bundle.json")
    path = base / "agent.toml"
    path.write_text(
        f"""
trust_domain = "{rig.trust_domain}"
socket = "{base}/agent.sock"
data_dir = "{base}/data"

[server]
address = "{rig.agent_api_address}"
bundle_file = "{base}/bundle.json"

[node_attestor.join_token]
token = "{token.token}"

[workload_attestors.unix]

[workload_api]
requests_per_second = 1000000
burst = 1000000

[agent_key]
custody = "memory"

{custody_toml(tiers)}
"""
    )
    return path


@contextlib.contextmanager
def agent_process(
    config: Path, *, profile: Path | None = None
) -> Iterator[tuple[subprocess.Popen[str], str, str]]:
    """``custos agent run`` until its ready line; yields (process, socket URI, agent
    SPIFFE ID). Stopped with SIGTERM at the end. With ``profile``, the agent runs under
    ``cProfile``, which writes that file when the agent stops (bench/agent_profile.py)."""
    prefix = ["-m", "cProfile", "-o", str(profile)] if profile is not None else []
    process = subprocess.Popen(
        [sys.executable, *prefix, "-m", "custos", "agent", "run", "--config", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # the agent's own 60 s bound ends a hung start
        if not line.startswith("custos agent ready: "):
            raise RuntimeError(f"custos agent run did not start: {line!r}")
        fields = dict(part.split("=", 1) for part in line.split(": ", 1)[1].split())
        yield process, fields["socket"], fields["spiffe_id"]
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def vm_rss_mib(pid: int) -> float:
    """VmRSS of ``pid`` in MiB (/proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used (/proc/<pid>/stat, all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def short_dir() -> Iterator[Path]:
    """A short temporary directory: a Unix socket path must fit in 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="custos-ab-"))
    try:
        yield path
    finally:
        import shutil

        shutil.rmtree(path, ignore_errors=True)


def uid_selector() -> str:
    return f"unix:uid:{os.getuid()}"
