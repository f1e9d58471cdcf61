"""A real TPM 2.0 for tests and demos: swtpm, provisioned like a shipped TPM.

This module does not import pytest (``custos.demo`` and ``swtpm/provision.sh`` use it
without a test framework); the fixtures built on it live in
:mod:`custos.testing.plugin`.

Provisioning (:func:`provision`) runs ``swtpm_setup --tpm2 --create-ek-cert
--create-platform-cert`` with *private* configuration files, so nothing is written
under ``/etc`` or ``/var``.  The resulting state directory looks like this::

    STATE_DIR/
      conf/swtpm_setup.conf         create_certs_tool -> swtpm_localca, banks
      conf/swtpm-localca.conf       statedir, signingkey, issuercert, certserial
      conf/swtpm-localca.options    platform manufacturer / model / version
      tpm/                          swtpm --tpmstate dir=... (the TPM's NV state)
      ca/issuercert.pem             the local CA that signed the EK certificates
      ca/swtpm-localca-rootca-cert.pem   the root above it
      ek/ek-rsa2048.crt, ek/ek-secp384r1.crt   copies of the EK certificates (DER)
      swtpm.pid, swtpm.log          written while an instance runs

The files in ``conf/`` are read only while provisioning (their paths are absolute,
so they are stale in a copy; nothing reads them later).

The TPM has an RSA-2048 EK (certificate in NV 0x01c00002), an ECC P-384 EK
(NV 0x01c00016) and a platform certificate (NV 0x01c08000); PCR banks sha1 and
sha256 are active, like most shipped TPMs.

``swtpm/provision.sh`` calls ``python -m custos.testing.swtpm provision DIR``:
this module is the one implementation (it needs nothing outside the standard library
and custos itself).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from custos.errors import CustosError

DEBIAN_PACKAGES = "swtpm swtpm-tools"
DEFAULT_PCR_BANKS = "sha1,sha256"
HOST = "127.0.0.1"

# tpm2-tss logs every expected NV miss (e.g. probing for an EK certificate that is
# not there) at ERROR level; silence ESAPI, keep real failures as exceptions.
os.environ.setdefault("TSS2_LOG", "esys+none")


class SwtpmError(CustosError):
    """swtpm could not be provisioned, started or reached."""

    code = "swtpm_error"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SwtpmError(
            f"{name!r} not found on PATH: the swtpm test rig needs the Debian packages "
            f"{DEBIAN_PACKAGES} (apt-get install {DEBIAN_PACKAGES})"
        )
    return path


# ---- provisioning ------------------------------------------------------------


@dataclass(frozen=True)
class ProvisionedState:
    """Where one provisioned TPM's files are (see the module docstring)."""

    root: Path

    @property
    def conf_dir(self) -> Path:
        return self.root / "conf"

    @property
    def tpm_dir(self) -> Path:
        return self.root / "tpm"

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def ek_dir(self) -> Path:
        return self.root / "ek"

    @property
    def issuer_cert(self) -> Path:
        return self.ca_dir / "issuercert.pem"

    @property
    def root_cert(self) -> Path:
        return self.ca_dir / "swtpm-localca-rootca-cert.pem"

    @property
    def ek_ca_certs(self) -> list[Path]:
        """PEM files of the EK certificate chain above the EK: issuer, then root."""
        return [self.issuer_cert, self.root_cert]

    @property
    def ek_certs(self) -> list[Path]:
        """DER copies of the EK certificates written at provisioning time."""
        return sorted(self.ek_dir.glob("*.crt"))

    def is_complete(self) -> bool:
        return (
            any(self.tpm_dir.glob("tpm2-*.permall"))
            and self.issuer_cert.is_file()
            and self.root_cert.is_file()
        )


def provision(state_dir: Path, *, pcr_banks: str = DEFAULT_PCR_BANKS) -> ProvisionedState:
    """Manufacture a TPM 2.0 state in ``state_dir`` (created; must not hold a TPM yet).

    About one second on swtpm 0.7: an RSA and an ECC EK with certificates from a
    local CA made on the spot, and a platform certificate.
    """
    setup, localca = _tool("swtpm_setup"), _tool("swtpm_localca")
    _tool("swtpm")
    state = ProvisionedState(Path(state_dir).absolute())
    if state.tpm_dir.exists() and any(state.tpm_dir.iterdir()):
        raise SwtpmError(f"{state.tpm_dir} already holds a TPM state; provision a new directory")
    for d in (state.root, state.conf_dir, state.tpm_dir, state.ca_dir, state.ek_dir):
        d.mkdir(parents=True, exist_ok=True, mode=0o700)

    localca_conf = state.conf_dir / "swtpm-localca.conf"
    localca_opts = state.conf_dir / "swtpm-localca.options"
    setup_conf = state.conf_dir / "swtpm_setup.conf"
    localca_conf.write_text(
        f"statedir = {state.ca_dir}\n"
        f"signingkey = {state.ca_dir / 'signkey.pem'}\n"
        f"issuercert = {state.issuer_cert}\n"
        f"certserial = {state.ca_dir / 'certserial'}\n"
    )
    localca_opts.write_text(
        "--platform-manufacturer custos\n--platform-version 2.1\n--platform-model swtpm\n"
    )
    setup_conf.write_text(
        f"create_certs_tool = {localca}\n"
        f"create_certs_tool_config = {localca_conf}\n"
        f"create_certs_tool_options = {localca_opts}\n"
        f"active_pcr_banks = {pcr_banks}\n"
    )
    cmd = [
        setup,
        "--tpm2",
        "--tpmstate",
        str(state.tpm_dir),
        "--create-ek-cert",
        "--create-platform-cert",
        "--config",
        str(setup_conf),
        "--pcr-banks",
        pcr_banks,
        "--write-ek-cert-files",
        str(state.ek_dir),
    ]
    # swtpm_setup and swtpm_localca look for per-user defaults under XDG_CONFIG_HOME;
    # pointing it at conf/ keeps the run from reading (or creating) ~/.config files.
    env = dict(os.environ, XDG_CONFIG_HOME=str(state.conf_dir))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    if proc.returncode != 0 or not state.is_complete():
        raise SwtpmError(
            f"swtpm_setup failed (exit {proc.returncode}) for {state.root}:\n"
            + (proc.stdout + proc.stderr)[-4000:]
        )
    return state


# ---- running instances -------------------------------------------------------


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # swtpm binds with SO_REUSEADDR, so a TIME_WAIT left by an earlier run does not block it.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


# Below Linux's default ephemeral range (32768-60999): the swtpm TCTI opens one TCP
# connection per TPM command, so a busy test run leaves thousands of client sockets in
# TIME_WAIT on ephemeral ports, and "bind to port 0 then check P+1" stops finding pairs.
_PORT_RANGE = (20000, 32000)


def free_port_pair() -> int:
    """A port P such that P and P+1 are both free right now (swtpm server + ctrl)."""
    rng = random.SystemRandom()
    for _ in range(500):
        port = rng.randrange(_PORT_RANGE[0], _PORT_RANGE[1], 2)
        if _port_free(port) and _port_free(port + 1):
            return port
    raise SwtpmError("no free TCP port pair found on 127.0.0.1")


def _die_with_parent() -> None:
    """prctl(PR_SET_PDEATHSIG, SIGKILL) in the child; no stdlib wrapper exists."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG


def ctrl_answers(ctrl_port: int) -> bool:
    """Ask swtpm's control channel for its capabilities (CMD_GET_CAPABILITY = 1).

    Hand-written because no library speaks swtpm's control protocol; it proves the
    process is up and serving, not merely that a port is bound.
    """
    try:
        with socket.create_connection((HOST, ctrl_port), timeout=1.0) as s:
            s.sendall(struct.pack(">I", 1))
            return len(s.recv(16)) >= 4
    except OSError:
        return False


@dataclass
class SwtpmInstance:
    """One swtpm process serving a provisioned state over TCP.

    ``kill()`` is a SIGKILL (device loss); ``start()``/``restart()`` reuse the same
    state, so keys created under the owner hierarchy stay loadable.
    """

    state_dir: Path
    port: int
    log_level: int = 1
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def ctrl_port(self) -> int:
        return self.port + 1

    @property
    def tcti(self) -> str:
        return f"swtpm:host={HOST},port={self.port}"

    @property
    def state(self) -> ProvisionedState:
        return ProvisionedState(self.state_dir)

    @property
    def ek_ca_certs(self) -> list[Path]:
        return self.state.ek_ca_certs

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def command(self) -> list[str]:
        return [
            _tool("swtpm"),
            "socket",
            "--tpm2",
            "--server",
            f"type=tcp,port={self.port},bindaddr={HOST}",
            "--ctrl",
            f"type=tcp,port={self.ctrl_port},bindaddr={HOST}",
            "--flags",
            "not-need-init,startup-clear",
            "--tpmstate",
            f"dir={self.state.tpm_dir}",
            "--pid",
            f"file={self.state_dir / 'swtpm.pid'}",
            "--log",
            f"file={self.state_dir / 'swtpm.log'},level={self.log_level}",
        ]

    def start(self, timeout: float = 10.0) -> None:
        """Start swtpm (not daemonized: we keep the Popen to reap it) and wait until it answers."""
        if self.running:
            return
        # Our own child, so a SIGKILL leaves no zombie that looks alive to `kill -0`;
        # its own session, so a Ctrl-C in the terminal reaches pytest (which stops it
        # in fixture teardown) and not swtpm; and a parent-death signal, so a pytest
        # killed outright leaves no orphan TPM behind (see spawn_child).
        self._proc = spawn_child(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                self._proc = None
                raise SwtpmError(f"swtpm exited at start (port {self.port}): {err.strip()}")
            if ctrl_answers(self.ctrl_port):
                return
            time.sleep(0.02)
        self.kill()
        raise SwtpmError(f"swtpm on port {self.port} did not answer within {timeout} s")

    def _reap(self, sig: int, timeout: float) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if proc.stderr is not None:
            proc.stderr.close()
        (self.state_dir / "swtpm.pid").unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL: the device vanishes mid-flight, as when a TPM is lost."""
        self._reap(signal.SIGKILL, 5.0)

    def stop(self) -> None:
        """Graceful stop (SIGTERM): swtpm writes its state and exits."""
        self._reap(signal.SIGTERM, 5.0)

    def restart(self, timeout: float = 10.0) -> None:
        self.stop()
        self.start(timeout)


def lockout_counter(tcti: str) -> int:
    """The TPM's dictionary-attack counter (``TPM_PT_LOCKOUT_COUNTER``, failedTries)."""
    from tpm2_pytss import ESAPI
    from tpm2_pytss.constants import TPM2_CAP, TPM2_PT

    with ESAPI(tcti) as ectx:
        _more, cap = ectx.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.LOCKOUT_COUNTER, 1)
        return int(cap.data.tpmProperties[0].value)


def reset_lockout(tcti: str) -> None:
    """``TPM2_DictionaryAttackLockReset`` with swtpm's empty lockout auth: failedTries to 0.

    A TPM that stops without ``TPM2_Shutdown`` (swtpm killed *or* stopped with
    SIGTERM) after a DA-protected object was used counts one failed try, and
    libtpms allows three (maxTries 3, recovery 1000 s): a rig that restarts its
    TPM more often than that must reset the counter, or every key without
    ``noDA`` (custos' workload keys; its storage primary has it) is refused
    with TPM_RC_LOCKOUT. See docs/decisions/0075-device-fault-rig.md.
    """
    from tpm2_pytss import ESAPI
    from tpm2_pytss.constants import ESYS_TR

    with ESAPI(tcti) as ectx:
        ectx.dictionary_attack_lock_reset(ESYS_TR.LOCKOUT)


def _pdeathsig_prefix() -> list[str] | None:
    """``setpriv --pdeathsig KILL --``: the parent-death signal set in the child by an
    exec'd tool instead of by Python code run between fork and exec."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else None


def spawn_child(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """Our own child in its own session, killed when its parent thread dies.

    The parent-death signal is set by util-linux ``setpriv --pdeathsig KILL`` after
    exec, so no Python code runs between fork and exec: with ``preexec_fn`` (ctypes
    prctl), in a process where grpcio's threads are busy ("Other threads are currently
    calling into gRPC, skipping fork() handlers"), the child sometimes died before
    exec with nothing on stderr (about one start in 20 in
    tests/agent/test_device_faults.py).  Without setpriv, ``preexec_fn`` it is.
    """
    prefix = _pdeathsig_prefix()
    if prefix is not None:
        return subprocess.Popen([*prefix, *argv], start_new_session=True, **kwargs)
    return subprocess.Popen(argv, start_new_session=True, preexec_fn=_die_with_parent, **kwargs)


def start_instance(state_dir: Path, *, attempts: int = 5) -> SwtpmInstance:
    """Start swtpm on a free port pair, retrying when another process grabs the ports first."""
    last: SwtpmError | None = None
    for _ in range(attempts):
        inst = SwtpmInstance(Path(state_dir), free_port_pair())
        try:
            inst.start()
            return inst
        except SwtpmError as e:  # most likely a port race with a parallel worker
            last = e
    assert last is not None
    raise last


def copy_state(template: ProvisionedState, dest: Path) -> ProvisionedState:
    """A private copy of a provisioned state (same EK, same CA): cheaper than provisioning."""
    shutil.copytree(
        template.root,
        dest,
        ignore=shutil.ignore_patterns("swtpm.pid", "swtpm.log", ".lock"),
    )
    return ProvisionedState(dest)


# ---- shared template and containers ------------------------------------------


def shared_template(base: Path) -> ProvisionedState:
    """One provisioned template under ``base``, made once however many processes ask.

    The pytest plugin passes the directory every xdist worker of one session shares
    (the parent of each worker's basetemp), so exactly one worker provisions while
    the others wait on an ``fcntl`` lock (fcntl rather than the filelock package:
    the rig is Linux-only anyway, swtpm being a Linux tool here). A crashed
    provisioning leaves only its staging directory, never a half template.
    """
    template = ProvisionedState(base / "custos-swtpm-template")
    with open(base / "custos-swtpm-template.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not template.is_complete():
            staging = base / f"custos-swtpm-template.{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            provision(staging)
            shutil.rmtree(template.root, ignore_errors=True)
            staging.rename(template.root)
    return template


@dataclass
class DockerSwtpm:
    """swtpm running from ``swtpm/docker-compose.yml`` through pytest-docker.

    ``make test`` runs the key-store contract once against it (the ``swtpm_container``
    fixture, tests/keys/test_contract_container.py); the local-process
    :class:`SwtpmInstance` stays the default for everything else.
    """

    port: int
    state_dir: Path
    compose_file: Path

    @property
    def tcti(self) -> str:
        return f"swtpm:host={HOST},port={self.port}"

    @property
    def ctrl_port(self) -> int:
        return self.port + 1

    @property
    def state(self) -> ProvisionedState:
        return ProvisionedState(self.state_dir)

    @property
    def ek_ca_certs(self) -> list[Path]:
        return self.state.ek_ca_certs

    def _compose(self, *args: str) -> None:
        # Debian's docker.io has no `docker compose` plugin; its docker-compose (v1) is
        # what make installs.  Elsewhere the plugin is the usual one.
        command = ["docker-compose"] if shutil.which("docker-compose") else ["docker", "compose"]
        subprocess.run([*command, "-f", str(self.compose_file), *args], check=True, timeout=120)

    def kill(self) -> None:
        self._compose("kill", "swtpm")

    def start(self, timeout: float = 60.0) -> None:
        self._compose("start", "swtpm")
        deadline = time.monotonic() + timeout
        while not ctrl_answers(self.ctrl_port):
            if time.monotonic() > deadline:
                raise SwtpmError("swtpm container did not come back")
            time.sleep(0.5)

    def stop(self) -> None:
        self._compose("stop", "swtpm")

    def restart(self, timeout: float = 60.0) -> None:
        self.stop()
        self.start(timeout)


# ---- command line (used by swtpm/provision.sh) -------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m custos.testing.swtpm")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("provision", help="manufacture a TPM 2.0 state with EK + platform certs")
    p.add_argument("state_dir", type=Path)
    p.add_argument("--pcr-banks", default=DEFAULT_PCR_BANKS)
    args = parser.parse_args(argv)
    existing = ProvisionedState(Path(args.state_dir).absolute())
    if existing.is_complete():
        # Run twice, keep the first TPM: a new EK would invalidate what was enrolled with it.
        print(f"already provisioned: {existing.root} (kept; delete it for a new TPM)")
        state = existing
    else:
        try:
            state = provision(args.state_dir, pcr_banks=args.pcr_banks)
        except SwtpmError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    print(f"tpm state:   {state.tpm_dir}")
    print(f"EK CA certs: {' '.join(str(p) for p in state.ek_ca_certs)}")
    print(f"EK certs:    {' '.join(str(p) for p in state.ek_certs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
