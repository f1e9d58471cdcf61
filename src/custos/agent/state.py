"""The agent's persistent state under ``data_dir``: small JSON documents written
atomically, read with a bound.

What the agent keeps between runs (its own identity, each workload's credentials)
must never be half written: a power cut or ``kill -9`` at any moment leaves either
the old file or the new one.  So every write goes to a temporary file in the same
directory, is flushed to disk (``fsync``), renamed over the target (``os.replace``:
atomic on POSIX) and the directory is flushed too, so the rename itself survives a
crash.  Files are ``0600`` and the directory ``0700``: they hold credentials (an
X.509-SVID, a WIT) that name this node.

A file that cannot be read back (not JSON, not an object, too large, not a regular
file) is *corrupt*: :func:`read_json` logs one clear line and treats it as absent,
so a damaged state never stops the agent from starting: it attests again (or
re-issues a workload's credentials) instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from custos._files import UnreadableFileError, read_small_file
from custos.errors import CustosError

log = logging.getLogger(__name__)

#: The largest state document read back (an SVID chain, a WIT and a bundle are a few KiB).
DEFAULT_MAX_STATE_BYTES = 1 << 20
_DIR_MODE = 0o700
_FILE_MODE = 0o600


class StateError(CustosError):
    """The data directory or a state file cannot be created or written."""

    code = "agent_state"


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and its parents) with mode 0700, or tighten an existing
    directory of ours to 0700; a path that is not a directory is a clear error."""
    try:
        path.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        st = path.lstat()
        if not stat.S_ISDIR(st.st_mode):
            raise StateError(f"data directory {str(path)!r} is not a directory")
        if stat.S_IMODE(st.st_mode) & 0o077:
            if st.st_uid != os.geteuid():
                raise StateError(
                    f"data directory {str(path)!r} is open to other users and not ours "
                    "to fix (chmod 700 it)"
                )
            # Credentials live here: nobody else may list or read them.
            path.chmod(_DIR_MODE)
    except OSError as e:
        raise StateError(
            f"cannot create data directory {str(path)!r}: {e.strerror or type(e).__name__}"
        ) from e
    return path


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably (mode 0600)."""
    directory = path.parent
    fd, temp = -1, ""
    try:
        fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        os.fchmod(fd, _FILE_MODE)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(temp, path)
        temp = ""
        _fsync_dir(directory)
    except OSError as e:
        raise StateError(
            f"cannot write state file {str(path)!r}: {e.strerror or type(e).__name__}"
        ) from e
    finally:
        if fd >= 0:
            os.close(fd)
        if temp:
            with contextlib.suppress(OSError):
                os.unlink(temp)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    """Replace ``path`` with ``obj`` as JSON, atomically and durably (mode 0600)."""
    try:
        data = json.dumps(obj, ensure_ascii=True, sort_keys=True, allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise StateError(f"cannot encode state for {str(path)!r}: {e}") from e
    write_bytes_atomic(path, data)


def read_json(path: Path, max_bytes: int = DEFAULT_MAX_STATE_BYTES) -> dict[str, Any] | None:
    """The JSON object in ``path``; ``None`` when it does not exist or is corrupt
    (logged with the reason: the caller starts over as if it were absent)."""
    try:
        data = read_small_file(path, max_bytes=max_bytes, what="state file")
    except UnreadableFileError as e:
        if e.reason != "missing":
            log.warning("ignoring state file %s: %s", path, e.message, extra={"code": e.code})
        return None
    try:
        obj = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        # Only the position: the file may hold credentials.
        where = f" (line {e.lineno})" if isinstance(e, json.JSONDecodeError) else ""
        log.warning(
            "ignoring corrupt state file %s: not UTF-8 JSON%s",
            path,
            where,
            extra={"code": "agent_state_corrupt"},
        )
        return None
    if not isinstance(obj, dict):
        log.warning(
            "ignoring corrupt state file %s: not a JSON object",
            path,
            extra={"code": "agent_state_corrupt"},
        )
        return None
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def remove_file(path: Path) -> None:
    """Delete ``path`` if it exists (and flush the directory)."""
    try:
        path.unlink()
    except FileNotFoundError:
        return
    except OSError as e:
        raise StateError(
            f"cannot remove state file {str(path)!r}: {e.strerror or type(e).__name__}"
        ) from e
    with contextlib.suppress(OSError):
        _fsync_dir(path.parent)


__all__ = [
    "DEFAULT_MAX_STATE_BYTES",
    "StateError",
    "ensure_private_dir",
    "read_json",
    "remove_file",
    "write_bytes_atomic",
    "write_json_atomic",
]
