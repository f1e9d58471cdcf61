"""The Docker engine in the test rig: start ``dockerd`` when it is not running (and
remember that we did, so only what we started is stopped), and build the one image
the tests use from a local root filesystem.

No image registry is reachable from the project's machines, so nothing is pulled:
the image is ``debootstrap --variant=minbase --include=swtpm,swtpm-tools,python3
bookworm DIR <mirror>`` (the Debian mirror apt already uses) imported with
``tar -C DIR -c . | docker import - custos-swtpm:<hash of the inputs>``, and also
tagged ``custos-swtpm:local`` (what ``swtpm/docker-compose.yml`` runs by default).
A tag that exists is reused: a second ``make test`` builds nothing.

One image serves both the swtpm container and the docker workload attestor's test
containers (a process that calls the agent's socket mounted into it).

Command line (used by the Makefile; decision 0100)::

    python -m custos.testing.docker up       # start dockerd unless it runs; record it
    python -m custos.testing.docker down     # stop dockerd only if `up` started it
    python -m custos.testing.docker image    # build the image unless it exists; print its tag
    python -m custos.testing.docker running  # exit 0 when an engine answers

This module does not import pytest.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from custos.errors import CustosError

DOCKER_SOCKET = "/var/run/docker.sock"
IMAGE_REPOSITORY = "custos-swtpm"
#: The moving tag the compose file runs unless CUSTOS_SWTPM_IMAGE names another.
LOCAL_TAG = f"{IMAGE_REPOSITORY}:local"
SUITE = "bookworm"
PACKAGES = ("swtpm", "swtpm-tools", "python3")
#: Bump when the recipe below changes in a way the inputs do not show.
RECIPE_VERSION = "1"
#: Where `up` records a dockerd it started (pid, log). Root-only machines: /run.
STATE_DIR_ENV = "CUSTOS_DOCKER_STATE"
DEFAULT_STATE_DIR = "/run/custos-testing"
ENGINE_START_TIMEOUT = 60.0
ENGINE_STOP_TIMEOUT = 30.0
BUILD_TIMEOUT = 900.0


class DockerRigError(CustosError):
    """The Docker engine could not be started, reached or used to build the image."""

    code = "docker_rig_error"


def state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV, DEFAULT_STATE_DIR))


def docker_binary() -> str:
    found = shutil.which("docker")
    if found is None:
        raise DockerRigError("docker not found: apt-get install docker.io (make deps does)")
    return found


# ---- the engine --------------------------------------------------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def engine_answers(sock_path: str = DOCKER_SOCKET, timeout: float = 2.0) -> bool:
    """True when a Docker engine answers ``GET /_ping`` with ``OK`` on its socket."""
    conn = _UnixHTTPConnection(sock_path, timeout)
    try:
        conn.request("GET", "/_ping")
        resp = conn.getresponse()
        return resp.status == 200 and resp.read(16) == b"OK"
    except OSError:
        return False
    finally:
        conn.close()


@dataclass(frozen=True)
class EngineRecord:
    """A dockerd this rig started: its pid and log (``<state dir>/dockerd.json``)."""

    pid: int
    log: str

    @staticmethod
    def path() -> Path:
        return state_dir() / "dockerd.json"

    @classmethod
    def load(cls) -> EngineRecord | None:
        try:
            data = json.loads(cls.path().read_text())
            return cls(int(data["pid"]), str(data["log"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self) -> None:
        self.path().parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path().with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": self.pid, "log": self.log}))
        tmp.replace(self.path())


def _is_dockerd(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "dockerd"
    except OSError:
        return False


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """A host-wide lock (pytest-xdist workers and make run side by side)."""
    path = Path(tempfile.gettempdir()) / f"custos-docker-{name}.lock"
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def start_engine(timeout: float = ENGINE_START_TIMEOUT) -> bool:
    """Start ``dockerd`` unless an engine answers on its socket. Returns True when this
    call started it (and recorded it for :func:`stop_engine`), False when one ran."""
    with _locked("engine"):
        if engine_answers():
            return False
        dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
        if not os.access(dockerd, os.X_OK):
            raise DockerRigError("dockerd not found: apt-get install docker.io (make deps does)")
        if os.geteuid() != 0:
            raise DockerRigError("dockerd must run as root: run make test as root or with sudo")
        sd = state_dir()
        sd.mkdir(parents=True, exist_ok=True)
        log = sd / "dockerd.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [dockerd],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,  # not killed by the terminal's ^C to make
            )
        EngineRecord(proc.pid, str(log)).save()
        deadline = time.monotonic() + timeout
        while not engine_answers():
            if proc.poll() is not None:
                EngineRecord.path().unlink(missing_ok=True)
                raise DockerRigError(
                    f"dockerd exited with status {proc.returncode}; last lines of {log}:\n"
                    + "\n".join(log.read_text(errors="replace").splitlines()[-10:])
                )
            if time.monotonic() > deadline:
                raise DockerRigError(f"dockerd did not answer within {timeout:.0f} s; see {log}")
            time.sleep(0.2)
        return True


def stop_engine(timeout: float = ENGINE_STOP_TIMEOUT) -> bool:
    """Stop the dockerd :func:`start_engine` started (SIGTERM, SIGKILL after
    ``timeout``); an engine someone else started is left alone. True when one stopped."""
    with _locked("engine"):
        record = EngineRecord.load()
        if record is None:
            return False
        try:
            if not _is_dockerd(record.pid):
                return False  # gone already, or the pid was recycled
            os.kill(record.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _is_dockerd(record.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _is_dockerd(record.pid):
                os.kill(record.pid, signal.SIGKILL)
            return True
        finally:
            EngineRecord.path().unlink(missing_ok=True)


def require_engine() -> None:
    """Raise a clear error unless an engine answers (pytest fixtures call this)."""
    if not engine_answers():
        raise DockerRigError(
            f"no Docker engine answers on {DOCKER_SOCKET}: `make docker-up` starts one "
            "(`make test` starts and stops it around the run)"
        )


# ---- the image -----------------------------------------------------------------------------


def _sources_entries(base: Path) -> list[tuple[list[str], list[str], list[str]]]:
    """(URIs, suites, components) of every ``deb`` source apt uses (deb822 and
    one-line formats)."""
    entries: list[tuple[list[str], list[str], list[str]]] = []
    for path in sorted((base / "sources.list.d").glob("*.sources")):
        for stanza in path.read_text(errors="replace").split("\n\n"):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line:
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes") != "no":
                entries.append(
                    (
                        fields.get("uris", "").split(),
                        fields.get("suites", "").split(),
                        fields.get("components", "").split(),
                    )
                )
    lists = [base / "sources.list", *sorted((base / "sources.list.d").glob("*.list"))]
    for path in lists:
        if not path.is_file():
            continue
        for line in path.read_text(errors="replace").splitlines():
            text = line.split("#", 1)[0].strip()
            if not text.startswith("deb "):
                continue
            text = text[4:].strip()
            if text.startswith("["):  # options: [arch=amd64 signed-by=...]
                text = text.partition("]")[2]
            rest = text.split()
            if len(rest) >= 2:
                entries.append(([rest[0]], [rest[1]], rest[2:]))
    return entries


def debian_mirror(suite: str = SUITE, *, apt_dir: Path = Path("/etc/apt")) -> str:
    """The mirror apt uses for ``suite`` ``main`` (not the security archive)."""
    for uris, suites, components in _sources_entries(apt_dir):
        if suite in suites and "main" in components:
            for uri in uris:
                if uri.startswith(("http://", "https://", "file:/")):
                    return uri
    raise DockerRigError(f"apt has no source for {suite} main in /etc/apt/sources.list(.d)")


def image_inputs(mirror: str | None = None) -> dict[str, object]:
    return {
        "suite": SUITE,
        "variant": "minbase",
        "packages": list(PACKAGES),
        "mirror": mirror if mirror is not None else debian_mirror(),
        "recipe": RECIPE_VERSION,
    }


def image_tag(mirror: str | None = None) -> str:
    """``custos-swtpm:<first 16 hex of SHA-256 over the build inputs>``."""
    blob = json.dumps(image_inputs(mirror), sort_keys=True).encode()
    return f"{IMAGE_REPOSITORY}:{hashlib.sha256(blob).hexdigest()[:16]}"


def image_exists(tag: str) -> bool:
    out = subprocess.run(
        [docker_binary(), "image", "inspect", "--format", "{{.Id}}", tag],
        capture_output=True,
        timeout=60,
    )
    return out.returncode == 0


@dataclass(frozen=True)
class BuiltImage:
    tag: str
    built: bool  # False: the tag existed and was reused
    seconds: float


def ensure_image(*, log: bool = True) -> BuiltImage:
    """The test image's tag, built first unless it exists (one build at a time host-wide)."""
    require_engine()
    tag = image_tag()
    t0 = time.monotonic()
    with _locked("image"):
        if image_exists(tag):
            if not image_exists(LOCAL_TAG):
                _docker("tag", tag, LOCAL_TAG)
            return BuiltImage(tag, False, time.monotonic() - t0)
        _build(tag, log=log)
        _docker("tag", tag, LOCAL_TAG)
    return BuiltImage(tag, True, time.monotonic() - t0)


def _docker(*args: str) -> None:
    out = subprocess.run([docker_binary(), *args], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise DockerRigError(f"docker {' '.join(args)} failed: {out.stderr.strip()}")


def _build(tag: str, *, log: bool) -> None:
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    if not os.access(debootstrap, os.X_OK):
        raise DockerRigError("debootstrap not found: apt-get install debootstrap (make deps does)")
    mirror = debian_mirror()
    # /var/tmp: the root filesystem is ~250 MB, more than a small /tmp may hold.
    with tempfile.TemporaryDirectory(prefix="custos-rootfs-", dir="/var/tmp") as tmp:
        root = Path(tmp) / "rootfs"
        if log:
            print(f"building {tag}: debootstrap {SUITE} from {mirror}", file=sys.stderr)
        boot = subprocess.run(
            [
                debootstrap,
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                SUITE,
                str(root),
                mirror,
            ],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
        )
        if boot.returncode != 0:
            tail = "\n".join((boot.stdout + boot.stderr).splitlines()[-15:])
            raise DockerRigError(f"debootstrap failed (status {boot.returncode}):\n{tail}")
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        try:
            imp = subprocess.run(
                [docker_binary(), "import", "-", tag],
                stdin=tar.stdout,
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT,
            )
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait(timeout=60)
        if imp.returncode != 0 or tar.returncode != 0:
            raise DockerRigError(f"docker import failed: {imp.stderr.strip()}")


# ---- command line ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m custos.testing.docker")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up", help="start dockerd unless it runs (recorded for `down`)")
    sub.add_parser("down", help="stop dockerd if `up` started it")
    sub.add_parser("image", help="build the test image unless it exists; print its tag")
    sub.add_parser("tag", help="print the test image's tag (nothing is built)")
    sub.add_parser("running", help="exit 0 when a Docker engine answers, 1 otherwise")
    args = parser.parse_args(argv)
    if args.cmd == "running":
        return 0 if engine_answers() else 1
    try:
        if args.cmd == "up":
            started = start_engine()
            print(
                "dockerd started (recorded: `down` stops it)"
                if started
                else "dockerd runs (started by `up`: `down` stops it)"
                if EngineRecord.load() is not None
                else "dockerd runs (not ours: `down` leaves it)"
            )
        elif args.cmd == "down":
            print("dockerd stopped" if stop_engine() else "no dockerd of ours to stop")
        elif args.cmd == "image":
            image = ensure_image()
            how = f"built in {image.seconds:.1f} s" if image.built else "exists"
            print(f"{image.tag} ({how}; also tagged {LOCAL_TAG})")
        else:
            print(image_tag())
    except CustosError as e:
        print(f"error [{e.code}]: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

__all__ = [
    "DOCKER_SOCKET",
    "IMAGE_REPOSITORY",
    "LOCAL_TAG",
    "BuiltImage",
    "DockerRigError",
    "EngineRecord",
    "debian_mirror",
    "engine_answers",
    "ensure_image",
    "image_tag",
    "require_engine",
    "start_engine",
    "stop_engine",
]
