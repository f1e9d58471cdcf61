"""A throwaway PostgreSQL server for tests and demos (no pytest import).

Debian's ``postgresql`` package puts its binaries under
``/usr/lib/postgresql/<major>/bin``; the newest one found is used. ``initdb``
refuses to run as root, so when we are root the cluster is created and run as
the unprivileged ``nobody`` user (``subprocess``'s ``user=``/``group=``), in a
fresh directory under the system temp dir (pytest's own temp dirs are mode
0700 and root's, so ``nobody`` could not enter them). The server listens on
127.0.0.1 only, on a free port, with its socket in that directory, ``trust``
authentication and durability switched off (a test database need not survive
a power cut).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from custos.errors import CustosError

#: The superuser initdb creates; every test database belongs to it.
SUPERUSER = "custos"
_PG_ROOT = Path("/usr/lib/postgresql")
_START_TIMEOUT = 60.0


class PostgresRigError(CustosError):
    """The test PostgreSQL server could not be found, created or started."""

    code = "postgres_rig_error"


def find_bin_dir(root: Path = _PG_ROOT) -> Path:
    """The ``bin`` directory of the newest installed PostgreSQL major version."""
    versions = sorted(
        (p for p in root.glob("*/bin") if (p / "initdb").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if not versions:
        raise PostgresRigError(
            f"no PostgreSQL under {root}: install Debian's postgresql package (make deps)"
        )
    return versions[-1]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_nobody(command: list[str]) -> tuple[list[str], dict[str, Any]]:
    """*command* and ``Popen`` keyword arguments that run it as ``nobody`` when we are
    root (initdb refuses root).

    Through ``setpriv`` rather than ``Popen(user=...)``: changing the uid makes Python
    ``fork()`` instead of ``vfork()``, and a fork in a process that has used gRPC runs
    gRPC's fork handlers in the child (seen: a test stopping and restarting its own
    PostgreSQL under a running server, the child logged a gRPC poller error and
    postgres never came up).  ``setpriv`` drops the privileges after the exec.
    """
    if os.geteuid() != 0:
        return command, {}
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        return [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups", *command], {}
    return command, {"user": "nobody", "group": "nogroup", "extra_groups": []}


@dataclass
class PostgresServer:
    """One running cluster; :meth:`stop` and :meth:`start` keep its data."""

    base: Path
    bin_dir: Path
    port: int
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _serial: int = field(default=0, repr=False)

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    @property
    def log_file(self) -> Path:
        return self.base / "postgres.log"

    def url(self, database: str = "postgres") -> str:
        """A SQLAlchemy URL (psycopg 3 driver) for ``database``."""
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _conninfo(self, database: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname={database}"

    def start(self) -> None:
        """Start (or restart) the server and wait until it accepts connections."""
        if self.process is not None and self.process.poll() is None:
            return
        command, as_nobody = _as_nobody(
            [
                str(self.bin_dir / "postgres"),
                "-D",
                str(self.data_dir),
                "-p",
                str(self.port),
                "-k",
                str(self.base),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]
        )
        log = open(self.log_file, "ab")
        self.process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            **as_nobody,
        )
        log.close()
        self._wait_ready()

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise PostgresRigError(f"postgres exited: {self._log_tail()}")
            try:
                psycopg.connect(self._conninfo(), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise PostgresRigError(
                        f"postgres did not start in {_START_TIMEOUT:g} s: {self._log_tail()}"
                    ) from None
                time.sleep(0.05)

    def _log_tail(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Fast shutdown (SIGINT: roll back open transactions, disconnect clients)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def create_database(self, name: str | None = None) -> str:
        """Create a fresh, empty database (cheap: a copy of template1); its URL."""
        import psycopg
        from psycopg import sql

        if name is None:
            self._serial += 1
            name = f"t{os.getpid()}_{self._serial}"
        with psycopg.connect(self._conninfo(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name``, disconnecting whoever is still in it."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self._conninfo(), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def destroy(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


def start_postgres(bin_dir: Path | None = None) -> PostgresServer:
    """initdb a new cluster in a fresh temp dir and start it; the caller destroys it."""
    bin_dir = bin_dir or find_bin_dir()
    base = Path(tempfile.mkdtemp(prefix="custos-pg-"))
    if os.geteuid() == 0:
        shutil.chown(base, "nobody", "nogroup")
    server = PostgresServer(base=base, bin_dir=bin_dir, port=_free_port())
    command, as_nobody = _as_nobody(
        [
            str(bin_dir / "initdb"),
            "-D",
            str(server.data_dir),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
        ]
    )
    try:
        subprocess.run(
            command, check=True, capture_output=True, stdin=subprocess.DEVNULL, **as_nobody
        )
        server.start()
    except subprocess.CalledProcessError as exc:
        server.destroy()
        raise PostgresRigError(
            f"initdb failed: {exc.stderr.decode(errors='replace')[-2000:]}"
        ) from None
    except BaseException:
        server.destroy()
        raise
    return server


__all__ = ["SUPERUSER", "PostgresRigError", "PostgresServer", "find_bin_dir", "start_postgres"]
