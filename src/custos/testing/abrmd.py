"""A TPM resource manager for tests: tpm2-abrmd on a private D-Bus, in front of swtpm.

swtpm has no resource manager: it holds three loaded objects, and transient handles
are global to every client (docs/decisions/0010-tpm-no-resource-manager.md).
Production runs behind ``/dev/tpmrm0``; tests that need several TPM clients at once
(two processes signing, an agent next to a CLI) or a device that vanishes under a
running agent run behind tpm2-abrmd instead, as DESIGN.md's facts describe::

    dbus-daemon --session --nofork --print-address=1       (a private session bus)
    tpm2-abrmd --session --allow-root --tcti=swtpm:host=127.0.0.1,port=P \\
               --dbus-name=com.intel.tss2.Tabrmd.custos<pid>x<n>
    TCTI  tabrmd:bus_name=<that name>,bus_type=session

**The bus address is not part of the TCTI string.**  The tabrmd TCTI's
configuration has two keys only, ``bus_name`` and ``bus_type`` (``system`` or
``session``); it reaches the session bus through GLib's ``g_bus_get``, which
reads ``DBUS_SESSION_BUS_ADDRESS`` from the environment.  So every process that
opens the TCTI needs that variable: :meth:`SessionBus.activate` sets it in this
process (and restores it after), :attr:`SessionBus.env` is the environment for a
child process.

GLib keeps one session-bus connection per process (a singleton, kept while any
D-Bus proxy uses it) and, for a bus connection, ends the process when the bus
goes away under it ("exit-on-close").  Hence:

- one :class:`SessionBus` per process at a time; several :class:`Abrmd` daemons
  may share it (each owns its own D-Bus name, so each has its own TCTI string);
- close every TPM store and ESAPI context on a tabrmd TCTI *before* stopping the
  bus (stopping tpm2-abrmd first is harmless: calls fail with a TCTI error).

Every process of the rig (and swtpm's, :mod:`custos.testing.swtpm`) is started with
a parent-death signal so that a killed test run leaves nothing behind.  Linux ties
that signal to the *thread* that forked, not the process: start and restart them
from a thread that lives as long as they should (the main thread), never from
``asyncio.to_thread`` or a pool thread that ends (measured: the daemon got SIGKILL
when the executor shut down).

What the rig found (decision 0075): tpm2-abrmd 3.0.0 can wedge on a device loss
(:meth:`Abrmd.wedged`), and every stop of swtpm after custos signed counted a
dictionary-attack failure until custos' keys got noDA.

This module does not import pytest; ``tests/agent/test_device_faults.py`` builds
its fixtures on it.  It needs the Debian packages ``tpm2-abrmd dbus
libtss2-tcti-tabrmd0`` (``make deps`` installs them).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from custos.testing.swtpm import (
    SwtpmError,
    SwtpmInstance,
    spawn_child,
    start_instance,
)

DEBIAN_PACKAGES = "tpm2-abrmd dbus libtss2-tcti-tabrmd0"
#: tpm2-abrmd's default name; ours add a per-process, per-daemon suffix.
BUS_NAME_PREFIX = "com.intel.tss2.Tabrmd"
_TABRMD_TCTI = "/usr/lib/x86_64-linux-gnu/libtss2-tcti-tabrmd.so.0"

_names = itertools.count(1)


class AbrmdError(SwtpmError):
    """tpm2-abrmd or its D-Bus daemon could not be started or reached."""

    code = "abrmd_error"


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        raise AbrmdError(
            f"{name!r} not found: the tpm2-abrmd test rig needs the Debian packages "
            f"{DEBIAN_PACKAGES} (apt-get install {DEBIAN_PACKAGES})"
        )
    return path


def available() -> bool:
    """Whether this machine can run the rig (tools on PATH; the tabrmd TCTI present)."""
    try:
        for tool in ("dbus-daemon", "dbus-send", "tpm2-abrmd"):
            _tool(tool)
    except AbrmdError:
        return False
    import ctypes.util

    return bool(ctypes.util.find_library("tss2-tcti-tabrmd")) or Path(_TABRMD_TCTI).exists()


def _line_buffered() -> list[str]:
    """``stdbuf -oL -eL`` when coreutils has it: the daemon's log is a file, and
    :meth:`Abrmd.wedged` reads it while the daemon runs."""
    stdbuf = shutil.which("stdbuf")
    return [stdbuf, "-oL", "-eL"] if stdbuf else []


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 5.0) -> None:
    if proc is None or proc.poll() is not None:
        if proc is not None:
            proc.wait()
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


@dataclass
class SessionBus:
    """A private ``dbus-daemon --session``: its address is :attr:`address`."""

    address: str = ""
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _saved: list[str | None] = field(default_factory=list, repr=False)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def env(self) -> dict[str, str]:
        """This process's environment with the bus address: for child processes."""
        return dict(os.environ, DBUS_SESSION_BUS_ADDRESS=self.address)

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        # Not --fork: our own child, reaped by us, killed with us (parent-death signal).
        self._proc = spawn_child(
            [_tool("dbus-daemon"), "--session", "--nofork", "--nopidfile", "--print-address=1"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        out = self._proc.stdout
        assert out is not None
        deadline = time.monotonic() + timeout
        line = b""
        # The address is the daemon's first line, printed once it listens.
        with contextlib.suppress(OSError):
            os.set_blocking(out.fileno(), False)
        while time.monotonic() < deadline and not line.endswith(b"\n"):
            if self._proc.poll() is not None:
                self._proc = None
                raise AbrmdError("dbus-daemon --session exited at start")
            chunk = out.read() or b""
            line += chunk
            if not chunk:
                time.sleep(0.01)
        out.close()
        if not line.endswith(b"\n"):
            self.stop()
            raise AbrmdError(f"dbus-daemon printed no address within {timeout} s")
        self.address = line.decode().strip()

    def stop(self) -> None:
        """Stop the daemon (close every tabrmd TPM context of this process first)."""
        proc, self._proc = self._proc, None
        _stop(proc)

    def has_owner(self, name: str) -> bool:
        """Whether ``name`` is owned on this bus (``org.freedesktop.DBus.NameHasOwner``)."""
        proc = subprocess.run(
            [
                _tool("dbus-send"),
                f"--bus={self.address}",
                "--print-reply",
                "--dest=org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus.NameHasOwner",
                f"string:{name}",
            ],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return proc.returncode == 0 and "boolean true" in proc.stdout

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        """``DBUS_SESSION_BUS_ADDRESS`` set to this bus in ``os.environ``, restored after.

        The tabrmd TCTI has no key for the address (only ``bus_name`` and
        ``bus_type``): GLib takes it from this variable when it first connects.
        """
        old = os.environ.get("DBUS_SESSION_BUS_ADDRESS")
        os.environ["DBUS_SESSION_BUS_ADDRESS"] = self.address
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("DBUS_SESSION_BUS_ADDRESS", None)
            else:
                os.environ["DBUS_SESSION_BUS_ADDRESS"] = old


@dataclass
class Abrmd:
    """tpm2-abrmd on ``bus`` serving the swtpm ``tpm`` under its own D-Bus name.

    :attr:`tcti` is what TPM clients open; they need the bus address in their
    environment (:meth:`SessionBus.activate`, :attr:`SessionBus.env`).  The swtpm
    may be killed and started again under a running daemon (:attr:`tpm`): calls
    fail with a TCTI I/O error meanwhile, and work again once it is back.
    """

    bus: SessionBus
    tpm: SwtpmInstance
    name: str = ""
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log_start: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if not self.name:
            self.name = f"{BUS_NAME_PREFIX}.custos{os.getpid()}x{next(_names)}"

    @property
    def tcti(self) -> str:
        return f"tabrmd:bus_name={self.name},bus_type=session"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """The daemon's exit status once it exited by itself (None while it runs)."""
        return self._proc.poll() if self._proc is not None else None

    @property
    def log_path(self) -> Path:
        return self.tpm.state_dir / "abrmd.log"

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        if not self.bus.running:
            raise AbrmdError("start the session bus before tpm2-abrmd")
        log = open(self.log_path, "ab")
        self._log_start = log.tell()
        try:
            self._proc = spawn_child(
                [
                    *_line_buffered(),
                    _tool("tpm2-abrmd"),
                    "--session",
                    "--allow-root",
                    "--logger=stdout",
                    f"--dbus-name={self.name}",
                    f"--tcti={self.tpm.tcti}",
                    "--flush-all",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.bus.env,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise AbrmdError(f"tpm2-abrmd exited at start: {tail.strip()}")
            if self.bus.has_owner(self.name):
                return
            time.sleep(0.05)
        self.stop()
        raise AbrmdError(f"tpm2-abrmd did not take {self.name} on the bus within {timeout} s")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        _stop(proc)

    def restart(self, timeout: float = 10.0) -> None:
        self.stop()
        self.start(timeout)

    def log_since_start(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_start)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def wedged(self) -> bool:
        """Whether this daemon can no longer swap objects out of the TPM.

        tpm2-abrmd 3.0.0 (Debian bookworm), measured: when the TPM connection
        breaks while it waits for the answer to a ``TPM2_ContextSave`` (the
        swap-out it does after every command), its SAPI context stays in the
        "receive response" stage and every later ``ContextSave`` fails with
        ``sys:Function called in the wrong order`` (0x80007).  Objects then stay
        loaded in the TPM until its slots are full (``TPM_RC_OBJECT_MEMORY`` to
        every client) — until the daemon is restarted.  Decision 0075.
        """
        return WEDGED_MARKER in self.log_since_start()


#: What tpm2-abrmd logs once its SAPI context is stuck (see :meth:`Abrmd.wedged`).
WEDGED_MARKER = "ContextSave failed: sys:Function called in the wrong order"


@dataclass
class AbrmdRig:
    """A session bus, one swtpm and tpm2-abrmd in front of it; :meth:`close` stops all."""

    bus: SessionBus
    abrmd: Abrmd
    #: Whether :meth:`close` stops the bus too (not when it was handed in, shared).
    own_bus: bool = True

    @property
    def tpm(self) -> SwtpmInstance:
        return self.abrmd.tpm

    @property
    def tcti(self) -> str:
        return self.abrmd.tcti

    @property
    def env(self) -> dict[str, str]:
        return self.bus.env

    def close(self) -> None:
        self.abrmd.stop()
        if self.own_bus:
            self.bus.stop()
        self.tpm.stop()


def start_rig(state_dir: Path, *, bus: SessionBus | None = None) -> AbrmdRig:
    """swtpm on the provisioned state ``state_dir``, a session bus (``bus``, else a
    new one) and tpm2-abrmd in front: ready when this returns."""
    own_bus = bus is None
    bus = bus if bus is not None else SessionBus()
    tpm: SwtpmInstance | None = None
    try:
        bus.start()
        tpm = start_instance(Path(state_dir))
        abrmd = Abrmd(bus, tpm)
        abrmd.start()
    except BaseException:
        if tpm is not None:
            tpm.stop()
        if own_bus:
            bus.stop()
        raise
    return AbrmdRig(bus, abrmd, own_bus)


__all__ = [
    "BUS_NAME_PREFIX",
    "DEBIAN_PACKAGES",
    "WEDGED_MARKER",
    "Abrmd",
    "AbrmdError",
    "AbrmdRig",
    "SessionBus",
    "available",
    "start_rig",
]
