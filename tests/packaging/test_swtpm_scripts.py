"""swtpm/provision.sh, start.sh and stop.sh: safe to run twice, and a start that
cannot happen says why (a port held by another process: which port, which pid)."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from custos.testing.swtpm import free_port_pair

SCRIPTS = Path(__file__).resolve().parents[2] / "swtpm"


def script(name: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPTS / name), *map(str, args)],
        capture_output=True, text=True, timeout=120,
    )


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("scripts") / "tpm"
    first = script("provision.sh", root)
    assert first.returncode == 0, first.stderr
    yield root
    script("stop.sh", root)


def test_provision_twice_keeps_the_first_tpm(state: Path) -> None:
    ek_before = sorted(p.read_bytes() for p in (state / "ek").glob("*.crt"))
    again = script("provision.sh", state)
    assert again.returncode == 0, again.stderr
    assert "already provisioned" in again.stdout
    assert sorted(p.read_bytes() for p in (state / "ek").glob("*.crt")) == ek_before


def test_start_names_the_port_and_its_holder(state: Path) -> None:
    port = free_port_pair()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port + 1))  # the control port
        squatter.listen()
        done = script("start.sh", state, str(port))
    assert done.returncode == 1
    assert f"port {port + 1}" in done.stderr and "control port" in done.stderr
    assert f"pid {os.getpid()}" in done.stderr
    assert not (state / "swtpm.pid").exists()


def test_start_twice_and_stop_twice(state: Path) -> None:
    port = free_port_pair()
    first = script("start.sh", state, str(port))
    assert first.returncode == 0, first.stderr
    try:
        assert f"TCTI swtpm:host=127.0.0.1,port={port}" in first.stdout
        again = script("start.sh", state, str(port))
        assert again.returncode == 0, again.stderr
        assert "already running" in again.stdout
        elsewhere = script("start.sh", state, str(free_port_pair()))
        assert elsewhere.returncode == 1
        assert "already runs for" in elsewhere.stderr
    finally:
        stopped = script("stop.sh", state)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    twice = script("stop.sh", state)
    assert twice.returncode == 0 and "not running" in twice.stdout


def test_start_on_an_unprovisioned_directory_says_so(tmp_path: Path) -> None:
    done = script("start.sh", tmp_path, "2321")
    assert done.returncode == 1
    assert "provision.sh" in done.stderr
