"""`make demo` must keep working: run it twice in a row, with no stdin, in a private
state directory, and check what it shows (the WIMSE scenario on custos dev's pieces)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def state() -> Iterator[Path]:
    # Short: the agent's and the admin's Unix sockets live under it (107 bytes at most).
    base = Path(tempfile.mkdtemp(prefix="custos-demo-"))
    base.chmod(0o755)  # the mTLS workloads (uids 1001/1002) reach the agent socket under it
    yield base / "demo-state"
    shutil.rmtree(base, ignore_errors=True)


def run_demo(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "custos.demo"], stdin=subprocess.DEVNULL,
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_demo_runs_twice_and_shows_the_caller_the_tpm_and_the_replay_refused(
    state: Path,
) -> None:
    env = dict(os.environ, CUSTOS_DEMO_STATE=str(state))
    env.pop("SOFTHSM2_CONF", None)
    env.pop("SPIFFE_ENDPOINT_SOCKET", None)
    first = run_demo(env)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    # `make demo` is safe to run twice: the second run starts over in the same directory.
    done = run_demo(env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in first.stderr + done.stderr
    lines = {line.strip().split("  ")[0]: line.strip() for line in done.stdout.splitlines()}
    assert lines["device"].split()[1] == "tpm:"
    # The agent was attested by the TPM: its ID is its EK's hash, and the EK selectors.
    assert re.fullmatch(r"agent SPIFFE ID +spiffe://example\.org/custos/agent/tpm/[0-9a-f]{64}",
                        lines["agent SPIFFE ID"]), lines["agent SPIFFE ID"]
    assert lines["agent attested by"].endswith(" tpm")
    assert "tpm:ek_issuer:swtpm-localca" in done.stdout
    assert lines["PCRs quoted (sha256)"].endswith(" 0,1,2,3,7")
    assert lines["key residency (server audit)"].endswith(" proven")
    assert lines["POST /pay"].endswith(" 200")
    assert lines["workload-b saw the caller"].endswith(" spiffe://example.org/dev/tpm")
    assert lines["custody tier (entry)"].endswith(" tpm")
    assert " in TpmKeyStore" in lines["key"]
    assert lines["TPM object attributes"].endswith(
        " fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda|sign")
    assert lines["WIT cnf.jwk is that key"].endswith(" yes")
    assert lines["export the private key"].endswith(" refused [export_refused]")
    assert lines["replayed request"].endswith(" refused: 401 [wpt_replayed]")
    if os.geteuid() == 0:  # two exportable workloads under uids 1001/1002, mTLS (py-spiffe)
        assert lines["server saw client"].endswith(
            " spiffe://example.org/demo/mtls-client said 'ping'")
        assert "(uid 1001)" in lines["server listening"]
        assert lines["client (uid 1002)"].endswith(
            " spiffe://example.org/demo/mtls-client got 'hello spiffe://example.org/demo/mtls-client'")
    # the swtpm, the agent and the server are gone again: no pid file, no socket
    assert not (state / "dev" / "tpm" / "swtpm.pid").exists()
    assert not (state / "run" / "agent.sock").exists()
    assert not (state / "dev" / "server" / "admin.sock").exists()
