"""The admin API's server: grpclib on a Unix socket, callers known by the kernel.

Who may call is decided from the caller's credentials as the kernel gives them
(``SO_PEERCRED``, read when the connection is accepted), never from anything the
caller sends: root, the server's own uid and ``admin.allowed_uids`` (decision
0038).  Everyone else gets PERMISSION_DENIED on every admin call, logged and
counted in ``custos_server_call_seconds{code="PERMISSION_DENIED"}``.  The socket
file's mode (0600, or 0660 when other uids are allowed) and its directory are a
second fence, not the check.

One request hook (grpclib's ``RecvRequest`` event) does, for every call: the uid
check, the call timing, and the translation of custos errors into a gRPC status
with a one-line ``"<code>: <message>"`` (details go to the log) — so the
servicers only raise.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpclib.const import Status
from grpclib.events import RecvRequest, listen
from grpclib.exceptions import GRPCError
from grpclib.health.check import ServiceCheck
from grpclib.health.service import OVERALL, Health
from grpclib.server import Server, Stream

from custos.errors import CustosError
from custos.identity import InvalidIdentifierError
from custos.server.admin.services import servicers
from custos.server.context import ServerContext
from custos.server.datastore.errors import (
    DatastoreUnavailableError,
    EntryExistsError,
    NotFoundError,
    RevisionConflictError,
)

log = logging.getLogger(__name__)

#: ``struct ucred`` (pid_t, uid_t, gid_t) as SO_PEERCRED returns it on Linux.
_UCRED = struct.Struct("iII")
#: The health service answers any caller who can open the socket: it says
#: SERVING or NOT_SERVING and nothing else (container health checks run as
#: whatever user the image sets).
_OPEN_PREFIX = "/grpc.health.v1.Health/"
#: Longest status message: one line for a terminal, not a dump.
_MAX_MESSAGE = 300


class AdminSocketError(CustosError):
    """The admin socket cannot be created (path taken, unsafe directory, in use)."""

    code = "admin_socket"


@dataclass(frozen=True)
class PeerCredentials:
    """The connecting process as the kernel saw it at ``connect()``."""

    pid: int
    uid: int
    gid: int


class _CredentialSocket(socket.socket):
    """A listening Unix socket whose ``accept()`` returns the caller's kernel
    credentials as the peer address.

    asyncio keeps the address ``accept()`` returns as the transport's
    ``peername``, which grpclib exposes per call as ``stream.peer.addr()``; a
    Unix socket's own peer address is an empty string, so nothing is lost.
    """

    def accept(self) -> tuple[socket.socket, Any]:
        conn, _ = super().accept()
        try:
            raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            return conn, PeerCredentials(*_UCRED.unpack(raw))
        except (OSError, struct.error) as e:
            # Unknown caller: the connection stays open and every call is refused.
            log.warning("admin socket: cannot read the caller's credentials: %s", e)
            return conn, None


def status_for(error: CustosError) -> Status:
    """The gRPC status of a custos error raised by an admin call."""
    if isinstance(error, DatastoreUnavailableError):
        return Status.UNAVAILABLE
    if isinstance(error, NotFoundError):
        return Status.NOT_FOUND
    if isinstance(error, EntryExistsError):
        return Status.ALREADY_EXISTS
    if isinstance(error, RevisionConflictError):
        return Status.ABORTED
    if isinstance(error, ValueError | InvalidIdentifierError):
        return Status.INVALID_ARGUMENT
    # Refused by the state of things (a banned agent, a key store problem).
    return Status.FAILED_PRECONDITION


def one_line(error: CustosError) -> str:
    """``"<code>: <message>"`` on one line: what the client turns back into an error."""
    text = " ".join(error.message.split())
    if len(text) > _MAX_MESSAGE:
        text = text[: _MAX_MESSAGE - 3] + "..."
    return f"{error.code}: {text}"


class AdminServer:
    """A running admin API; :meth:`close` stops it and removes the socket file."""

    def __init__(self, ctx: ServerContext, server: Server, path: Path) -> None:
        self._ctx = ctx
        self._server = server
        self.path = path
        #: The uids every admin call is allowed from.
        self.allowed_uids = frozenset((*ctx.config.admin.uids, os.geteuid()))
        listen(server, RecvRequest, self._on_request)

    async def close(self) -> None:
        self._server.close()
        await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _on_request(self, event: RecvRequest) -> None:
        method = event.method_name
        if method.startswith(_OPEN_PREFIX):
            return
        started = time.perf_counter()
        peer = event.peer.addr()
        if not isinstance(peer, PeerCredentials) or peer.uid not in self.allowed_uids:
            who = f"uid {peer.uid} (pid {peer.pid})" if isinstance(peer, PeerCredentials) else "?"
            log.warning("admin API: %s refused for %s: uid not allowed", method, who)
            self._observe(method, Status.PERMISSION_DENIED, started)
            raise GRPCError(
                Status.PERMISSION_DENIED,
                "admin_permission_denied: this uid may not use the admin API "
                "(root, the server's uid and admin.allowed_uids may)",
            )
        inner = event.method_func
        event.method_func = lambda stream: self._call(method, inner, stream, started)

    async def _call(
        self, method: str, inner: Any, stream: Stream[Any, Any], started: float
    ) -> None:
        status = Status.OK
        try:
            await inner(stream)
        except GRPCError as e:
            status = e.status
            raise
        except CustosError as e:
            status = status_for(e)
            if isinstance(e, DatastoreUnavailableError):
                self._ctx.metrics.datastore_errors.labels(method).inc()
            log.info("admin API: %s refused: [%s] %s", method, e.code, e.message)
            raise GRPCError(status, one_line(e)) from None
        except BaseException:
            status = Status.UNKNOWN
            raise
        finally:
            self._observe(method, status, started)

    def _observe(self, method: str, status: Status, started: float) -> None:
        self._ctx.metrics.call_seconds.labels(method, status.name).observe(
            time.perf_counter() - started
        )


def _datastore_check(ctx: ServerContext) -> ServiceCheck:
    async def answers() -> bool:
        await asyncio.to_thread(ctx.datastore.entries.count)
        return True

    return ServiceCheck(answers)


def _check_directory(directory: Path, mode: int) -> None:
    """The socket's directory exists (made with ``mode`` if not), is ours or
    root's, and nobody else can write into it (they could swap the socket)."""
    try:
        directory.mkdir(mode=mode, parents=True, exist_ok=True)
        info = directory.lstat()
    except OSError as e:
        raise AdminSocketError(
            f"cannot create the admin socket's directory {directory}: {e}"
        ) from e
    if not stat.S_ISDIR(info.st_mode):
        raise AdminSocketError(f"the admin socket's directory {directory} is not a directory")
    if info.st_uid not in (0, os.geteuid()):
        raise AdminSocketError(
            f"the admin socket's directory {directory} belongs to uid {info.st_uid}, "
            f"not to this server (uid {os.geteuid()}) or root"
        )
    if info.st_mode & 0o022:
        raise AdminSocketError(
            f"the admin socket's directory {directory} is writable by group or others "
            f"(mode {stat.S_IMODE(info.st_mode):04o}); make it 0700 or 0750"
        )


def _remove_stale(path: Path) -> None:
    """Remove a socket left by a server that is gone; refuse anything else."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise AdminSocketError(f"{path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise AdminSocketError(f"cannot tell whether {path} is in use: {e}") from e
        log.info("admin socket: removing the stale socket %s", path)
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise AdminSocketError(f"{path} is in use by a running server", code="admin_socket_in_use")


def _listening_socket(path: Path, *, others: bool) -> socket.socket:
    """The bound socket: 0600 in a 0700 directory, or 0660 in a 0711 one when
    uids other than root and the server's may call (they need to reach it)."""
    _check_directory(path.parent, 0o711 if others else 0o700)
    _remove_stale(path)
    sock = _CredentialSocket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        # The directory is ours and closed to others, so the moment between
        # bind (umask mode) and chmod is not reachable by another user.
        os.chmod(path, 0o660 if others else 0o600)
    except OSError as e:
        sock.close()
        raise AdminSocketError(f"cannot create the admin socket {path}: {e}") from e
    return sock


async def serve_admin(
    ctx: ServerContext, *, health_checks: Collection[ServiceCheck] | None = None
) -> AdminServer:
    """Start the admin API (and grpclib's health service) on ``config.admin.socket``.

    ``health_checks`` decide the health service's answer; by default the
    datastore must answer.
    """
    path = Path(ctx.config.admin.socket)
    sock = _listening_socket(path, others=bool(ctx.config.admin.allowed_uids))
    checks = list(health_checks) if health_checks is not None else [_datastore_check(ctx)]
    server = Server([*servicers(ctx), Health({OVERALL: checks})])
    admin = AdminServer(ctx, server, path)
    try:
        await server.start(sock=sock)
    except BaseException:
        sock.close()
        path.unlink(missing_ok=True)
        raise
    log.info("admin API listening on %s (uids %s)", path, sorted(admin.allowed_uids))
    return admin
