"""Fixtures for the WIMSE tests: a real ``redis-server`` on a free loopback port.

The server runs without persistence (``--save '' --appendonly no``) in a
temporary directory and is stopped after the test that asked for it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis  # a dev dependency: missing means a broken install, not a test to skip


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=2, **kwargs
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def _start(tmp: Path) -> RedisServer:
    binary = shutil.which("redis-server")
    if binary is None:
        # `make test` installs it; a skip here would hide the Redis tests in CI.
        pytest.fail("redis-server is not installed (Debian package redis-server; `make deps`)")
    port = _free_port()
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp),
            "--protected-mode",
            "yes",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = RedisServer(port, process)
    deadline = time.monotonic() + 15
    while True:
        try:
            if server.client().ping():
                return server
        except redis.ConnectionError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError("redis-server did not come up")
        time.sleep(0.05)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = _start(tmp_path)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server_factory(tmp_path: Path) -> Iterator[Callable[[], RedisServer]]:
    """Start extra servers (e.g. one to kill mid-test); all are stopped afterwards."""
    started: list[RedisServer] = []

    def start() -> RedisServer:
        d = tmp_path / f"redis{len(started)}"
        d.mkdir()
        server = _start(d)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()
