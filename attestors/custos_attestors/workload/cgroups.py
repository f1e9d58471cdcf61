"""``/proc/<pid>/cgroup``: read it for a caller (through the pidfd rule) and find the
container ID, the Kubernetes pod UID and the systemd unit in it.

Shared by the ``docker``, ``k8s`` and ``systemd`` workload attestors.

The file has one line per hierarchy, ``<id>:<controllers>:<path>``: cgroup v1 lists
one line per mounted hierarchy (``4:memory:/...``, ``1:name=systemd:/...``), v2 a
single ``0::/...`` line, a hybrid system both.  The path may itself contain ``:``.

Rules (decision 0095):

- every line is scanned, and a path is never anchored at the root: a nested
  layout (``4:memory:/<something>/<container id>``, kind inside Docker, a
  container runtime under a host's own slice) still yields its IDs;
- within one path, the container ID is the *last* segment holding a 64-hex word
  (``docker/<id>``, ``docker-<id>.scope``, ``cri-containerd-<id>.scope``,
  ``crio-<id>.scope``, ``.../pod<uid>/<id>``); the pod UID is the last
  ``pod<uid>`` word at or before it (cgroupfs ``pod1b2c-...`` or the systemd
  driver's ``kubepods-besteffort-pod1b2c_...slice``, underscores read as dashes);
- across lines, a line with a pod UID wins over lines without one (kind on a
  Docker host: the host's ``0::/docker/<id>/system.slice/containerd.service``
  line must not hide the pod's); two different pod UIDs, or two different
  container IDs among the winning lines, are a conflict: :class:`CgroupConflictError`,
  never a guess;
- the systemd unit is the first segment that names a unit (not a slice) on the
  ``name=systemd`` line, else on the ``0::`` line (systemd's own rule: the unit of
  ``/user.slice/user-1000.slice/user@1000.service/app.slice/x.service`` is
  ``user@1000.service``).

Hex IDs come back lower-case.  Text that is not a cgroup file (no line of the
``<id>:<controllers>:<path>`` shape) raises :class:`CgroupFormatError`.

A cgroup's name is chosen by whoever creates it.  :func:`check_runtime_owned` checks
that the cgroups naming the container are owned by root (runtimes make them as
root; a process with a delegated subtree makes its own), through this process's
mount table; the attestors offer it as a setting (``check_cgroup_owner``).
"""

from __future__ import annotations

import os
import re
import signal
import stat
from dataclasses import dataclass

from custos._files import UnreadableFileError, read_small_text
from custos.plugin.errors import PluginError
from custos.plugin.protocols import PeerCredentials

#: A process is in at most a few dozen hierarchies; a path is at most PATH_MAX-ish.
#: 64 KiB is far above any real file and bounds what a caller can make us parse.
MAX_CGROUP_BYTES = 64 * 1024

_HEX = "0-9a-fA-F"
_CONTAINER_ID = re.compile(rf"(?<![\w])([{_HEX}]{{64}})(?![\w])", re.ASCII)
_POD_UID = re.compile(
    rf"(?<![\w])pod([{_HEX}]{{8}}[-_][{_HEX}]{{4}}[-_][{_HEX}]{{4}}[-_][{_HEX}]{{4}}[-_][{_HEX}]{{12}})(?![\w])",
    re.ASCII,
)
_LINE = re.compile(r"^([0-9]+):([^:]*):(.*)$", re.ASCII)

#: Unit types that can hold processes (slices cannot; they only group).
_PROCESS_UNIT_SUFFIXES = (".service", ".scope", ".socket", ".mount", ".swap")
#: systemd's unit name alphabet (unit-name.c: VALID_CHARS plus "@" for instances).
_UNIT_NAME = re.compile(r"^[A-Za-z0-9:_.\\@-]+$", re.ASCII)
_UNIT_NAME_MAX = 255


class CgroupError(PluginError):
    """Root of the cgroup errors (the caller's attestation fails closed)."""

    code = "workload_cgroup"


class CgroupFormatError(CgroupError):
    """The text is not a ``/proc/<pid>/cgroup`` file."""

    code = "workload_cgroup_malformed"


class CgroupConflictError(CgroupError):
    """Two lines of the file name different pods, containers or units."""

    code = "workload_cgroup_conflict"


class CgroupCallerGoneError(CgroupError):
    """The caller exited while its cgroup file was read: the PID may be anyone's."""

    code = "workload_caller_gone"


class CgroupReadError(CgroupError):
    """The caller's cgroup file could not be read (or the pidfd is not a pidfd)."""

    code = "workload_proc_unreadable"


@dataclass(frozen=True)
class CgroupLine:
    hierarchy: int
    controllers: tuple[str, ...]
    path: str


def parse(cgroup_text: str) -> list[CgroupLine]:
    """Every line of a cgroup file (blank lines skipped)."""
    lines: list[CgroupLine] = []
    # "\n" only: the kernel ends lines with it, and a cgroup name may hold any other
    # character (str.splitlines would also split at \r, \x1c, \x85, \u2028 ...).
    for raw in cgroup_text.split("\n"):
        if not raw.strip():
            continue
        m = _LINE.match(raw)
        if m is None:
            raise CgroupFormatError(
                "a line of the cgroup file is not <hierarchy>:<controllers>:<path>"
            )
        controllers = tuple(c for c in m.group(2).split(",") if c)
        lines.append(CgroupLine(int(m.group(1)), controllers, m.group(3)))
    if not lines:
        raise CgroupFormatError("the cgroup file has no lines")
    return lines


def _ids_in_path(path: str, want_pod: bool) -> tuple[str | None, str | None]:
    """(pod UID, container ID) of one path: walk back to the last segment with a
    64-hex word, then back from what precedes it in that segment for ``pod<uid>``."""
    pod, container, _ = _ids_and_prefix(path, want_pod)
    return pod, container


def _ids_and_prefix(path: str, want_pod: bool) -> tuple[str | None, str | None, str]:
    """As :func:`_ids_in_path`, plus the path through the container ID's segment."""
    segments = path.split("/")
    container: str | None = None
    index = len(segments) - 1
    head = ""
    while index >= 0:
        matches = list(_CONTAINER_ID.finditer(segments[index]))
        if matches:
            m = matches[-1]  # the last match in the segment
            container = m.group(1).lower()
            head = segments[index][: m.start(1)]
            break
        index -= 1
    prefix = "/".join(segments[: index + 1]) if container is not None else ""
    if container is None or not want_pod:
        return None, container, prefix
    candidates = [head, *reversed(segments[:index])]
    for segment in candidates:
        pods = list(_POD_UID.finditer(segment))
        if pods:
            return pods[-1].group(1).replace("_", "-").lower(), container, prefix
    return None, container, prefix


def pod_and_container(cgroup_text: str) -> tuple[str | None, str | None]:
    """(pod UID, container ID), either ``None`` when absent; see the module rules."""
    pod: str | None = None
    container: str | None = None
    for line in parse(cgroup_text):
        line_pod, line_container = _ids_in_path(line.path, True)
        if line_container is None:
            continue
        if pod is not None and line_pod is None:
            continue  # a line with a pod UID already won
        if pod is None and line_pod is not None:
            pod, container = line_pod, line_container
            continue
        if line_pod != pod:
            raise CgroupConflictError(f"the cgroup file names two pods: {pod} and {line_pod}")
        if container is not None and line_container != container:
            raise CgroupConflictError(
                f"the cgroup file names two containers: {container} and {line_container}"
            )
        container = line_container
    return pod, container


def container_id(cgroup_text: str) -> str | None:
    """The container ID (64 lower-case hex) every ID-bearing line agrees on (a line
    naming a pod wins over lines without), ``None`` when no line has one."""
    return pod_and_container(cgroup_text)[1]


def pod_uid(cgroup_text: str) -> str | None:
    """The Kubernetes pod UID (lower-case, dashed), ``None`` when no line has one."""
    return pod_and_container(cgroup_text)[0]


def _unit_in_path(path: str) -> str | None:
    for segment in path.split("/"):
        if not segment or segment.endswith(".slice"):
            continue
        if (
            segment.endswith(_PROCESS_UNIT_SUFFIXES)
            and len(segment) <= _UNIT_NAME_MAX
            and _UNIT_NAME.match(segment)
            and not segment.startswith(".")
        ):
            return segment
    return None


def systemd_unit(cgroup_text: str) -> str | None:
    """The systemd unit (``nginx.service``, ``session-3.scope``) the process runs in,
    from the ``name=systemd`` line (cgroup v1, hybrid) or else the ``0::`` line (v2);
    ``None`` when neither names one."""
    lines = parse(cgroup_text)
    found: str | None = None
    for want in ("v1", "v2"):
        for line in lines:
            is_v1 = "name=systemd" in line.controllers
            is_v2 = line.hierarchy == 0 and not line.controllers
            if (want == "v1" and not is_v1) or (want == "v2" and not is_v2):
                continue
            unit = _unit_in_path(line.path)
            if unit is None:
                continue
            if found is not None and unit != found:
                raise CgroupConflictError(
                    f"the cgroup file names two systemd units: {found} and {unit}"
                )
            found = unit
    return found


# --- who made the container's cgroup ---------------------------------------------------


class CgroupOwnerError(CgroupError):
    """A cgroup that names the caller's container is not owned by root (a process with a
    delegated cgroup subtree made it), or cannot be found to check."""

    code = "workload_cgroup_not_runtime"


@dataclass(frozen=True)
class CgroupMount:
    """A cgroup hierarchy mounted in this process's mount namespace (``mountinfo``)."""

    version: int  # 1 or 2
    root: str  # the hierarchy's directory shown at the mount point
    mountpoint: str
    options: frozenset[str]  # v1: the controllers and name= of the hierarchy


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[CgroupMount]:
    """The cgroup and cgroup2 mounts of a ``/proc/<pid>/mountinfo`` text."""
    mounts: list[CgroupMount] = []
    for line in text.split("\n"):
        pre, sep, post = line.partition(" - ")
        if not sep:
            continue
        fields, tail = pre.split(" "), post.split(" ")
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        mounts.append(
            CgroupMount(
                version=2 if tail[0] == "cgroup2" else 1,
                root=_unescape(fields[3]),
                mountpoint=_unescape(fields[4]),
                options=frozenset(tail[2].split(",")),
            )
        )
    return mounts


def cgroup_directory(line: CgroupLine, path: str, mounts: list[CgroupMount]) -> str | None:
    """Where ``path`` of ``line``'s hierarchy is in this mount namespace, or ``None``."""
    for mount in mounts:
        if line.hierarchy == 0 and not line.controllers:
            if mount.version != 2:
                continue
        elif mount.version != 1 or not set(line.controllers) <= mount.options:
            continue
        root = mount.root.rstrip("/")
        if root and path != root and not path.startswith(root + "/"):
            continue
        rest = path[len(root) :].lstrip("/")
        if ".." in rest.split("/"):
            continue  # outside this process's cgroup namespace
        return os.path.join(mount.mountpoint, rest)
    return None


def check_runtime_owned(cgroup_text: str, *, mountinfo: str = "/proc/self/mountinfo") -> None:
    """Raise :class:`CgroupOwnerError` unless every cgroup that names the caller's
    container (the path through the container ID's segment, on each line naming it) is a
    directory owned by root in this process's view of the hierarchy.

    Container runtimes, the kubelet and systemd create those as root; a process given a
    delegated subtree (systemd ``Delegate=``, a user manager's ``user@<uid>.service``)
    creates cgroups owned by its own uid, so a cgroup it names like a pod or container is
    refused here.  Does nothing when no line names a container (decision 0095)."""
    pod, container = pod_and_container(cgroup_text)
    if container is None:
        return
    try:
        mounts = parse_mountinfo(read_small_text(mountinfo, max_bytes=1 << 20, what="mount table"))
    except UnreadableFileError as e:
        raise CgroupOwnerError(f"cannot check who made the caller's cgroup: {e.message}") from e
    for line in parse(cgroup_text):
        line_pod, line_container, prefix = _ids_and_prefix(line.path, True)
        if line_container != container or (pod is not None and line_pod != pod):
            continue
        directory = cgroup_directory(line, prefix, mounts)
        if directory is None:
            raise CgroupOwnerError(
                f"the cgroup {prefix!r} of hierarchy {line.hierarchy} is not mounted here: "
                "cannot check who made it"
            )
        try:
            st = os.lstat(directory)
        except OSError as e:
            raise CgroupOwnerError(
                f"cannot check who made the cgroup {prefix!r}: {e.strerror or type(e).__name__}"
            ) from None
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
            raise CgroupOwnerError(
                f"the cgroup {prefix!r} that names container {container} is owned by uid "
                f"{st.st_uid}, not root: not made by a container runtime"
            )


def ensure_alive(peer: PeerCredentials) -> None:
    """Raise :class:`CgroupCallerGoneError` unless ``peer.pidfd`` is still alive
    (``EPERM`` still proves it exists)."""
    try:
        signal.pidfd_send_signal(peer.pidfd, 0)
    except ProcessLookupError:
        raise CgroupCallerGoneError(f"process {peer.pid} exited during attestation") from None
    except PermissionError:
        return
    except OSError as e:
        raise CgroupReadError(
            f"cannot check that process {peer.pid} is alive: {e.strerror or type(e).__name__}"
        ) from e


def read_cgroup(peer: PeerCredentials, *, proc: str = "/proc") -> str:
    """``<proc>/<pid>/cgroup`` of the caller, read with a bound, then trusted only
    after the caller's pidfd is shown still alive (a live process keeps its PID, so
    the file was the caller's).  Raises :class:`CgroupCallerGoneError` when the
    process is gone, :class:`CgroupReadError` when the file cannot be read."""
    path = f"{proc}/{peer.pid}/cgroup"
    try:
        text = read_small_text(path, max_bytes=MAX_CGROUP_BYTES, what="caller cgroup file")
    except UnreadableFileError as e:
        if e.reason == "missing":
            raise CgroupCallerGoneError(
                f"process {peer.pid} exited before it was attested"
            ) from None
        raise CgroupReadError(e.message) from e
    ensure_alive(peer)
    return text


__all__ = [
    "MAX_CGROUP_BYTES",
    "CgroupCallerGoneError",
    "CgroupConflictError",
    "CgroupError",
    "CgroupFormatError",
    "CgroupLine",
    "CgroupMount",
    "CgroupOwnerError",
    "CgroupReadError",
    "cgroup_directory",
    "check_runtime_owned",
    "container_id",
    "ensure_alive",
    "parse",
    "parse_mountinfo",
    "pod_and_container",
    "pod_uid",
    "read_cgroup",
    "systemd_unit",
]
