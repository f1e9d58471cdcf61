"""Bounded reads of small configuration files: keys, PINs, bundles, tokens.

Every file custos reads on a user's say-so goes through :func:`read_small_file`.
A path is data from the user, so it may name a FIFO (``open`` blocks forever),
``/dev/zero`` (``read`` never ends) or a multi-gigabyte log: only a regular file
no larger than the caller's cap is read, and anything else is one clear
:class:`UnreadableFileError` naming the path and the reason.
"""

from __future__ import annotations

import os
import stat

from custos.errors import CustosError

#: A cap that fits every file custos reads (keys, PINs, bundles, tokens, configs).
DEFAULT_MAX_BYTES = 1 << 20


class UnreadableFileError(CustosError):
    """A file named by the user is missing, not a regular file, too large or unreadable."""

    code = "unreadable_file"

    def __init__(self, message: str, *, path: str, reason: str) -> None:
        super().__init__(message)
        self.path = path
        #: one of ``missing``, ``not_regular``, ``too_large``, ``os_error``, ``not_utf8``
        self.reason = reason


def read_small_file(
    path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES, what: str = "file"
) -> bytes:
    """Return the bytes of the regular file *path*, refusing anything else.

    *what* names the file in errors ("key file", "pin-source", ...).  The file is
    opened with ``O_NONBLOCK`` so that a FIFO cannot block the open, checked with
    ``fstat`` on the opened descriptor (no stat/open race), and read with a cap of
    ``max_bytes + 1`` so a file that grows while being read is refused too.
    """
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise UnreadableFileError(
            f"{what} {name!r} does not exist", path=name, reason="missing"
        ) from None
    except OSError as e:
        raise UnreadableFileError(
            f"cannot open {what} {name!r}: {e.strerror or type(e).__name__}",
            path=name,
            reason="os_error",
        ) from e
    except ValueError:
        # os.open raises ValueError, not OSError, for a path with an embedded NUL byte
        # (no such path can exist on POSIX); "from None": nothing more to say.
        raise UnreadableFileError(
            f"cannot open {what} {name!r}: the path contains a NUL byte",
            path=name,
            reason="os_error",
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnreadableFileError(
                f"{what} {name!r} is not a regular file", path=name, reason="not_regular"
            )
        if st.st_size > max_bytes:
            raise UnreadableFileError(
                f"{what} {name!r} is larger than {max_bytes} bytes",
                path=name,
                reason="too_large",
            )
        chunks: list[bytes] = []
        remaining = max_bytes + 1
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        data = b"".join(chunks)
        if len(data) > max_bytes:
            raise UnreadableFileError(
                f"{what} {name!r} is larger than {max_bytes} bytes",
                path=name,
                reason="too_large",
            )
        return data
    except OSError as e:
        raise UnreadableFileError(
            f"cannot read {what} {name!r}: {e.strerror or type(e).__name__}",
            path=name,
            reason="os_error",
        ) from e
    finally:
        os.close(fd)


def read_small_text(
    path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES, what: str = "file"
) -> str:
    """Like :func:`read_small_file`, decoded as UTF-8 (a clear error otherwise)."""
    data = read_small_file(path, max_bytes=max_bytes, what=what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        # "from None": the decode error quotes bytes of the file (maybe a secret).
        raise UnreadableFileError(
            f"{what} {os.fspath(path)!r} is not UTF-8 text",
            path=os.fspath(path),
            reason="not_utf8",
        ) from None


__all__ = ["DEFAULT_MAX_BYTES", "UnreadableFileError", "read_small_file", "read_small_text"]
