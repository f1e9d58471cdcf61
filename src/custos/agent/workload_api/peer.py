"""Who is calling on the agent's socket, as the kernel says: SO_PEERCRED + a pidfd.

The credentials are read once, when the connection is accepted, and travel with
the connection as its peer address (asyncio keeps what ``accept()`` returns as
the transport's ``peername``; grpclib hands it to every call as
``stream.peer.addr()``), so nothing a caller sends can change who it is.

The pidfd pins the process itself: a PID can be recycled once its process is
reaped, a pidfd cannot. It comes from ``SO_PEERPIDFD`` where the kernel has it
(Linux 6.5+: the very process that connected), else from ``os.pidfd_open(pid)``
right after ``accept()`` (the fallback has a window: the caller could exit and
its PID be reused between connect and pidfd_open; attestors re-check liveness
afterwards, which closes the window for a caller that is gone, not for a PID
reused within microseconds, which is what SO_PEERPIDFD is for).

The :class:`Caller` owns its pidfd. It is closed when the connection closes
(asyncio closes the socket) or, failing that, when the caller is collected; a
released caller counts as exited, so a handler still holding it never asks a
reused fd number about liveness.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import socket
import struct
import time
import weakref
from typing import Any

from custos.errors import CustosError
from custos.identity.selector import Selector
from custos.plugin.protocols import PeerCredentials

log = logging.getLogger(__name__)

#: ``struct ucred`` (pid_t, uid_t, gid_t) as SO_PEERCRED returns it on Linux.
_UCRED = struct.Struct("iII")
#: getsockopt(SOL_SOCKET, SO_PEERPIDFD): Linux 6.5+ (Python has no constant yet).
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)
_INT = struct.Struct("i")


def process_exited(pidfd: int) -> bool:
    """True when the process behind ``pidfd`` has exited (a zombie counts as exited).

    A pidfd turns readable when its process exits. ``pidfd_send_signal(fd, 0)``
    would still succeed for a zombie (exited, not yet reaped), so it cannot tell
    a caller that died from one that is alive; a zero-timeout poll can.
    """
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def _peer_pidfd(conn: socket.socket, pid: int) -> int:
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, _INT.size)
        return int(_INT.unpack(raw)[0])
    except OSError:
        # Older kernel (ENOPROTOOPT): take the pidfd at once, by PID.
        return os.pidfd_open(pid)


class Caller:
    """One connection's caller: kernel credentials, its pidfd, and the selectors
    its last attestation gave (cached briefly, per connection)."""

    __slots__ = ("__weakref__", "_pidfd", "attested_at", "credentials", "lock", "selectors")

    def __init__(self, credentials: PeerCredentials) -> None:
        self.credentials = credentials
        self.selectors: tuple[Selector, ...] | None = None
        self.attested_at = 0.0
        #: held while this connection's caller is attested (concurrent calls wait)
        self.lock = asyncio.Lock()
        self._pidfd = weakref.finalize(self, os.close, credentials.pidfd)

    @property
    def uid(self) -> int:
        return self.credentials.uid

    @property
    def pid(self) -> int:
        return self.credentials.pid

    def exited(self) -> bool:
        """The caller is gone: its process exited, or its connection closed."""
        return not self._pidfd.alive or process_exited(self.credentials.pidfd)

    def release(self) -> None:
        """Close the pidfd now (the connection closed); idempotent."""
        self._pidfd()

    def cached_selectors(self, max_age: float) -> tuple[Selector, ...] | None:
        if self.selectors is not None and time.monotonic() - self.attested_at < max_age:
            return self.selectors
        return None

    def remember(self, selectors: tuple[Selector, ...]) -> None:
        self.selectors = selectors
        self.attested_at = time.monotonic()

    def __repr__(self) -> str:
        c = self.credentials
        return f"Caller(pid={c.pid}, uid={c.uid}, gid={c.gid})"


def read_caller(conn: socket.socket) -> Caller | None:
    """The caller on ``conn``, or None when the kernel cannot say (logged): such
    a connection stays open and every call on it is refused."""
    pidfd = -1
    try:
        pid, uid, gid = _UCRED.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
        pidfd = _peer_pidfd(conn, pid)
        return Caller(PeerCredentials(pid=pid, uid=uid, gid=gid, pidfd=pidfd))
    except (OSError, struct.error, ValueError, CustosError) as e:
        # ProcessLookupError (the caller already exited) lands here too.
        if pidfd >= 0:
            os.close(pidfd)
        log.warning("workload API: cannot read the caller's credentials: %s", e)
        return None


class _Connection(socket.socket):
    """An accepted connection that releases its caller's pidfd when closed."""

    caller: Caller | None = None

    def close(self) -> None:
        super().close()
        if self.caller is not None:
            self.caller.release()


class CallerSocket(socket.socket):
    """A listening Unix socket whose ``accept()`` returns the :class:`Caller`
    as the peer address (a Unix socket's own peer address is an empty string,
    so nothing is lost)."""

    def accept(self) -> tuple[socket.socket, Any]:
        accepted, _ = super().accept()
        conn = _Connection(accepted.family, accepted.type, accepted.proto,
                           fileno=accepted.detach())
        conn.caller = read_caller(conn)
        return conn, conn.caller


__all__ = ["SO_PEERPIDFD", "Caller", "CallerSocket", "process_exited", "read_caller"]
