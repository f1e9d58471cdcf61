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
import contextlib
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


#: Open connections one uid may hold: each costs the agent a socket and a pidfd,
#: and a caller that opens thousands would run the agent out of file descriptors.
#: (``WorkloadApiLimits.max_connections_per_uid`` has the same default.)
DEFAULT_MAX_CONNECTIONS_PER_UID = 256


class _Connection(socket.socket):
    """An accepted connection that releases its caller when closed."""

    caller: Caller | None = None
    listener: CallerSocket | None = None

    def close(self) -> None:
        super().close()
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.forget(self)
        caller, self.caller = self.caller, None
        if caller is not None:
            caller.release()
            if listener is not None:
                listener.closed(caller.uid)


class CallerSocket(socket.socket):
    """A listening Unix socket whose ``accept()`` returns the :class:`Caller`
    as the peer address (a Unix socket's own peer address is an empty string,
    so nothing is lost), and that holds each uid to ``max_per_uid`` open
    connections (one more is closed at once: asyncio's accept loop takes
    ``ConnectionAbortedError`` as "nothing to accept now")."""

    def __init__(self, max_per_uid: int = DEFAULT_MAX_CONNECTIONS_PER_UID) -> None:
        super().__init__(socket.AF_UNIX, socket.SOCK_STREAM)
        self.max_per_uid = max_per_uid
        # Touched only by accept() and close(), both on the event loop.
        self._counts: dict[int, int] = {}
        #: Every accepted connection not yet closed (for close_connections()).
        self._connections: set[_Connection] = set()
        #: uids refused since their last accepted connection (logged once)
        self._refused: set[int] = set()

    def accept(self) -> tuple[socket.socket, Any]:
        accepted, _ = super().accept()
        conn = _Connection(accepted.family, accepted.type, accepted.proto,
                           fileno=accepted.detach())
        caller = read_caller(conn)
        if caller is not None:
            if self._counts.get(caller.uid, 0) >= self.max_per_uid:
                self._refuse(conn, caller)
            self._counts[caller.uid] = self._counts.get(caller.uid, 0) + 1
            self._refused.discard(caller.uid)
        conn.listener = self
        conn.caller = caller
        self._connections.add(conn)
        return conn, caller

    def forget(self, conn: _Connection) -> None:
        self._connections.discard(conn)

    async def close_connections(self, timeout: float = 2.0) -> None:
        """Close every accepted connection that is still open.

        ``shutdown(SHUT_RD)`` first: the transport reads end-of-file, flushes what
        it still has to write (the calls' trailers) and closes the socket itself.
        What is still open after ``timeout`` is shut down both ways.
        """
        for conn in list(self._connections):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RD)
        deadline = time.monotonic() + timeout
        while self._connections and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self._connections):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def _refuse(self, conn: socket.socket, caller: Caller) -> None:
        conn.close()
        caller.release()
        if caller.uid not in self._refused:
            self._refused.add(caller.uid)
            log.warning("workload API: a connection from pid %d refused: uid %d has %d open "
                        "(further refusals are not logged until one is accepted)", caller.pid,
                        caller.uid, self.max_per_uid)
        raise ConnectionAbortedError("too many connections from one uid")

    def closed(self, uid: int) -> None:
        left = self._counts.get(uid, 1) - 1
        if left > 0:
            self._counts[uid] = left
        else:
            self._counts.pop(uid, None)

    def open_connections(self, uid: int) -> int:
        return self._counts.get(uid, 0)


__all__ = [
    "DEFAULT_MAX_CONNECTIONS_PER_UID",
    "SO_PEERPIDFD",
    "Caller",
    "CallerSocket",
    "process_exited",
    "read_caller",
]
