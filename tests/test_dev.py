"""``custos dev`` as a user runs it: a subprocess whose two stdout lines are all a
workload (``custos wit fetch``, ``WorkloadClient``) and an admin (``custos entry list``)
need; SIGTERM stops it with exit 0, its swtpm and its sockets gone."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from custos.client import WorkloadClient

BOUND = 90.0


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Short: the sockets under it must fit in 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="custos-dv-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def custos(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "custos", *args], capture_output=True,
                          text=True, timeout=BOUND, env=env, stdin=subprocess.DEVNULL)


def read_lines(process: subprocess.Popen[str], count: int) -> list[str]:
    """*count* stdout lines, or fail after BOUND (the reader thread keeps the wait bounded)."""
    lines: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        while len(lines) < count:
            line = process.stdout.readline()
            if not line:
                return
            lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(BOUND)
    return lines


def stop(process: subprocess.Popen[str], sig: signal.Signals = signal.SIGTERM) -> int:
    if process.poll() is None:
        process.send_signal(sig)
    try:
        return process.wait(BOUND)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


def test_dev_serves_a_workload_and_an_admin_then_stops_cleanly(short_dir: Path) -> None:
    data = short_dir / "d"
    process = subprocess.Popen(
        [sys.executable, "-m", "custos", "dev", "--data-dir", str(data)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = read_lines(process, 2)
        assert lines == [f"SPIFFE_ENDPOINT_SOCKET=unix://{data}/agent.sock",
                         f"CUSTOS_ADMIN_SOCKET=unix://{data}/server/admin.sock"], lines
        swtpm_pid = int((data / "tpm" / "swtpm.pid").read_text().strip())
        env = dict(os.environ, **dict(line.split("=", 1) for line in lines))

        fetched = custos("wit", "fetch", "--spiffe-id", "spiffe://example.org/dev/tpm", env=env)
        assert fetched.returncode == 0, fetched.stderr
        assert fetched.stdout.count(".") == 2  # one compact JWS

        async def sign() -> None:
            async with WorkloadClient(env["SPIFFE_ENDPOINT_SOCKET"]) as client:
                wit, wpt = await client.sign_wpt("https://b.example/pay",
                                                 spiffe_id="spiffe://example.org/dev/tpm")
                assert wit.count(".") == 2 and wpt.count(".") == 2

        asyncio.run(sign())

        listed = custos("entry", "list", "--output", "json", env=env)
        assert listed.returncode == 0, listed.stderr
        ids = sorted(e["spiffe_id"] for e in json.loads(listed.stdout)["entries"])
        assert ids == [f"spiffe://example.org/dev/{t}" for t in ("exportable", "memory", "tpm")]
        assert all(e["selectors"] == [f"unix:uid:{os.getuid()}"]
                   for e in json.loads(listed.stdout)["entries"])

        # The agent was attested by the TPM: its ID is the EK hash, its selectors tpm:.
        agents = custos("agent", "list", "--output", "json", env=env)
        assert agents.returncode == 0, agents.stderr
        [agent] = json.loads(agents.stdout)["agents"]
        ek_hash = agent["id"].removeprefix("spiffe://example.org/custos/agent/tpm/")
        assert re.fullmatch(r"[0-9a-f]{64}", ek_hash), agent["id"]
        assert agent["attestor"] == "tpm" and agent["attestation_key"]
        assert f"tpm:ek_pubhash:{ek_hash}" in agent["selectors"]
        assert "tpm:ek_issuer:swtpm-localca" in agent["selectors"]
        assert any(s.startswith("tpm:manufacturer:id:") for s in agent["selectors"])
        assert any(s.startswith("tpm:pcr:sha256:7:") for s in agent["selectors"])
        assert all(e["parent_id"] == agent["id"] for e in json.loads(listed.stdout)["entries"])
    finally:
        status = stop(process)
    stderr = process.stderr.read() if process.stderr else ""
    assert status == 0, stderr[-2000:]
    assert "key custody on tpm" in stderr
    assert "attested by tpm" in stderr
    assert "Traceback" not in stderr
    assert not Path(f"/proc/{swtpm_pid}").exists()
    assert not (data / "agent.sock").exists()
    assert not (data / "server" / "admin.sock").exists()


def test_dev_refuses_a_data_dir_it_did_not_make(short_dir: Path) -> None:
    (short_dir / "precious.txt").write_text("mine\n")
    done = custos("dev", "--data-dir", str(short_dir))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error [dev_error]: --data-dir ")
    assert "Traceback" not in done.stderr
    assert (short_dir / "precious.txt").read_text() == "mine\n"
    assert done.stdout == ""


def test_dev_refuses_a_socket_path_too_long_for_unix(short_dir: Path) -> None:
    done = custos("dev", "--data-dir", str(short_dir / "d"), "--socket",
                  str(short_dir / ("s" * 120)))
    assert done.returncode == 1
    assert "longer than 107 bytes" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(("device", "sig"), [("pkcs11", signal.SIGINT),
                                             ("memory", signal.SIGTERM)])
def test_dev_without_a_tpm_keeps_keys_in_the_device_it_says(
    short_dir: Path, device: str, sig: signal.Signals
) -> None:
    data = short_dir / "d"
    process = subprocess.Popen(
        [sys.executable, "-m", "custos", "dev", "--data-dir", str(data), "--device", device],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = read_lines(process, 2)
        assert len(lines) == 2, lines
        env = dict(os.environ, **dict(line.split("=", 1) for line in lines))
        listed = custos("entry", "list", "--output", "json", env=env)
        assert listed.returncode == 0, listed.stderr
        custody = {e["spiffe_id"]: e["key_custody"] for e in json.loads(listed.stdout)["entries"]}
        want = (device, "memory", "exportable") if device != "memory" else ("memory", "exportable")
        assert custody == {f"spiffe://example.org/dev/{t}": t for t in want}
        fetched = custos("wit", "fetch", "--spiffe-id", f"spiffe://example.org/dev/{device}",
                         env=env)
        assert fetched.returncode == 0, fetched.stderr
    finally:
        status = stop(process, sig)
    stderr = process.stderr.read() if process.stderr else ""
    assert status == 0, stderr[-2000:]
    assert f"key custody on {device}: " in stderr and "Traceback" not in stderr
    # Without a TPM the agent keeps the join-token path.
    assert "/custos/agent/join_token/" in stderr and "attested by join_token" in stderr
    assert not (data / "tpm").exists()
    assert not (data / "agent.sock").exists()


def test_readme_custos_dev_blocks_run_as_written(short_dir: Path) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## One machine: `custos dev`"):]
    start, client = (b.replace("/tmp/custos-dev", str(short_dir / "d"))
                     for b in re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL)[:2])
    command, *printed = start.strip().splitlines()
    bindir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    env.pop("SPIFFE_ENDPOINT_SOCKET", None)
    env.pop("CUSTOS_ADMIN_SOCKET", None)
    process = subprocess.Popen(["bash", "-c", f"exec {command.split('#')[0]}"], env=env,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        lines = read_lines(process, 2)
        assert lines == [line.removeprefix("# ") for line in printed]
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", client], env=env,
                              capture_output=True, text=True, timeout=BOUND)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert "Found 3 entries" in done.stdout
        assert (short_dir / "d-svid" / "svid.key").exists()
    finally:
        assert stop(process) == 0
