"""What the ``unix`` attestor reads about a caller: ``/proc/<pid>/status`` and the
caller's executable, and the bounded cache of executable hashes.

A PID alone can be recycled.  Everything read here through ``/proc/<pid>`` is
trusted only once :func:`ensure_alive` has shown, *after* the reads, that the
caller's pidfd still refers to a live process: a live process keeps its PID, so
the PID named that process for the whole time the reads took.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from custos._files import UnreadableFileError, read_small_text
from custos.errors import CustosError

log = logging.getLogger(__name__)

#: ``/proc/<pid>/status`` is about 1.5 KiB; its ``Groups`` line can list up to
#: NGROUPS_MAX (65536) ids, about 700 KiB.  Anything larger is not a status file.
MAX_STATUS_BYTES = 1 << 20
#: One read of the executable while hashing it.
_CHUNK_BYTES = 1 << 20


class UnixAttestationError(CustosError):
    """The ``unix`` attestor could not establish the caller's facts (the caller is denied)."""

    code = "unix_attestation"


class CallerGoneError(UnixAttestationError):
    """The caller exited (or is exiting) while it was attested: its PID may be anyone's."""

    code = "workload_caller_gone"


class CallerCredentialsChangedError(UnixAttestationError):
    """The caller's effective uid or gid in ``/proc`` differs from the kernel's peer
    credentials taken when it connected (it ran a set-uid program or changed ids
    since; another process holding the same socket could otherwise borrow them)."""

    code = "workload_credentials_changed"


class ProcReadError(UnixAttestationError):
    """A ``/proc`` entry of the caller could not be read or makes no sense."""

    code = "workload_proc_unreadable"


@dataclass(frozen=True)
class ProcStatus:
    """The lines of ``/proc/<pid>/status`` the attestor uses."""

    #: ``R``, ``S``, ``D``, ``Z`` (zombie), ``X`` (dead), ...
    state: str
    #: real, effective, saved set, filesystem
    uids: tuple[int, int, int, int]
    gids: tuple[int, int, int, int]
    #: supplementary groups, as the kernel lists them
    groups: tuple[int, ...]

    @property
    def exited(self) -> bool:
        return self.state in ("Z", "X")


def _ids(line: str, what: str, count: int | None) -> tuple[int, ...]:
    fields = line.split()
    if count is not None and len(fields) != count:
        raise ProcReadError(f"the {what} line of the caller's status has {len(fields)} fields")
    if not all(f.isascii() and f.isdigit() for f in fields):
        raise ProcReadError(f"the {what} line of the caller's status is not a list of ids")
    return tuple(int(f) for f in fields)


def parse_status(text: str) -> ProcStatus:
    """The ``State``, ``Uid``, ``Gid`` and ``Groups`` lines of a status file."""
    lines: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key in ("State", "Uid", "Gid", "Groups"):
            lines[key] = value
    missing = [k for k in ("State", "Uid", "Gid", "Groups") if k not in lines]
    if missing:
        raise ProcReadError(f"the caller's status has no {', '.join(missing)} line")
    state = lines["State"].strip()[:1]
    uids = _ids(lines["Uid"], "Uid", 4)
    gids = _ids(lines["Gid"], "Gid", 4)
    return ProcStatus(
        state=state,
        uids=(uids[0], uids[1], uids[2], uids[3]),
        gids=(gids[0], gids[1], gids[2], gids[3]),
        groups=_ids(lines["Groups"], "Groups", None),
    )


def read_status(pid: int) -> ProcStatus:
    """``/proc/<pid>/status``, parsed (bounded read; trust it only after :func:`ensure_alive`)."""
    try:
        text = read_small_text(
            f"/proc/{pid}/status", max_bytes=MAX_STATUS_BYTES, what="caller status"
        )
    except UnreadableFileError as e:
        if e.reason == "missing":
            raise CallerGoneError(f"process {pid} exited before it was attested") from None
        raise ProcReadError(e.message) from e
    return parse_status(text)


def ensure_alive(pidfd: int, pid: int) -> None:
    """Raise :class:`CallerGoneError` unless the pidfd's process still exists.

    Signal 0 checks existence only.  ``EPERM`` (an agent that is not root asking
    about another user's process) still proves the process exists.  A zombie
    passes this check but keeps its PID, and :class:`ProcStatus.exited` catches it.
    """
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except ProcessLookupError:
        raise CallerGoneError(f"process {pid} exited during attestation") from None
    except PermissionError:
        return
    except OSError as e:
        # EBADF / EINVAL: not a pidfd at all. The caller's identity is unproven.
        raise ProcReadError(
            f"cannot check that process {pid} is alive: {e.strerror or type(e).__name__}"
        ) from e


@contextmanager
def _proc_errors(pid: int, doing: str) -> Iterator[None]:
    """OS errors of a ``/proc/<pid>`` access as the attestor's errors: a missing entry
    means the caller is gone; anything else (EACCES for an agent that is not root) is
    a read error."""
    try:
        yield
    except FileNotFoundError:
        raise CallerGoneError(f"process {pid} exited before it was attested") from None
    except OSError as e:
        raise ProcReadError(
            f"cannot {doing} of process {pid}: {e.strerror or type(e).__name__}"
        ) from e


def executable_path(pid: int) -> str:
    """The caller's executable as ``/proc/<pid>/exe`` names it (`` (deleted)`` kept:
    the file at that path is no longer what runs)."""
    with _proc_errors(pid, "read the executable path"):
        return os.readlink(f"/proc/{pid}/exe")


#: What identifies one version of a file: device, inode, mtime, ctime, size.  ctime
#: cannot be set by a user (utime changes it), so a rewrite that restores the
#: mtime still misses the cache.
FileKey = tuple[int, int, int, int, int]


def _file_key(st: os.stat_result) -> FileKey:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)


class ExecutableHashCache:
    """SHA-256 of callers' executables, cached by file version, bounded twice:
    at most ``max_entries`` cached results (least recently used dropped first), and
    no file larger than ``max_bytes`` is read at all (its result is "no hash").

    Hashing runs in a worker thread, one file at a time (an asyncio lock), so
    callers that bring many large binaries cannot make the agent hash them all at
    once, and the event loop keeps serving while one is hashed.
    """

    def __init__(self, *, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        #: file version -> hex digest, or None for "larger than max_bytes"
        self._entries: OrderedDict[FileKey, str | None] = OrderedDict()
        self._mutex = threading.Lock()  # the dict is touched from worker threads too
        self._hashing: asyncio.Lock | None = None
        #: results served from the cache / computed (or refused) afresh
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        with self._mutex:
            return len(self._entries)

    def _get(self, key: FileKey) -> tuple[bool, str | None]:
        with self._mutex:
            if key not in self._entries:
                return False, None
            self._entries.move_to_end(key)
            self.hits += 1
            return True, self._entries[key]

    def _put(self, key: FileKey, digest: str | None) -> None:
        with self._mutex:
            self.misses += 1
            self._entries[key] = digest
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    async def sha256(self, pid: int) -> str | None:
        """The hex SHA-256 of process ``pid``'s executable, or ``None`` when it is
        larger than ``max_bytes`` (logged once per file version)."""
        with _proc_errors(pid, "open the executable"):
            # /proc/<pid>/exe opens the very file the process runs, even if it was
            # deleted or replaced at its path since.
            fd = os.open(f"/proc/{pid}/exe", os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ProcReadError(f"the executable of process {pid} is not a regular file")
            key = _file_key(st)
            found, digest = self._get(key)
            if found:
                return digest
            if self._hashing is None:
                self._hashing = asyncio.Lock()
            async with self._hashing:
                found, digest = self._get(key)  # another caller may have hashed it meanwhile
                if found:
                    return digest
                digest = await asyncio.to_thread(self._hash, fd, key, pid)
            self._put(key, digest)
            return digest
        finally:
            os.close(fd)

    def _hash(self, fd: int, key: FileKey, pid: int) -> str | None:
        size = key[4]
        if size > self.max_bytes:
            log.warning(
                "unix attestor: the executable of process %d (device %d, inode %d) is %d bytes, "
                "over max_binary_bytes %d: no sha256 selector",
                pid,
                key[0],
                key[1],
                size,
                self.max_bytes,
            )
            return None
        digest = hashlib.sha256()
        total = 0
        offset = 0
        while True:
            # pread: the descriptor's offset is never shared with anyone else's reads.
            chunk = os.pread(fd, _CHUNK_BYTES, offset)
            if not chunk:
                break
            offset += len(chunk)
            total += len(chunk)
            if total > self.max_bytes:
                raise ProcReadError(f"the executable of process {pid} grew while it was hashed")
            digest.update(chunk)
        if total != size or _file_key(os.fstat(fd)) != key:
            # Hashing bytes that changed underneath would cache a hash of no real file.
            raise ProcReadError(f"the executable of process {pid} changed while it was hashed")
        return digest.hexdigest()


__all__ = [
    "MAX_STATUS_BYTES",
    "CallerCredentialsChangedError",
    "CallerGoneError",
    "ExecutableHashCache",
    "ProcReadError",
    "ProcStatus",
    "UnixAttestationError",
    "ensure_alive",
    "executable_path",
    "parse_status",
    "read_status",
]
