"""The agent's Unix socket: grpclib serving the SPIFFE Workload API and custos'
WIMSE signing API (decisions 2 and 3, 0044, 0045).

Every call goes through :class:`_Calls`, which decides who the caller is before
any handler runs:

1. the kernel's view of the connection (:class:`~custos.agent.workload_api.peer.Caller`:
   SO_PEERCRED + pidfd, read at accept);
2. SPIFFE calls must carry ``workload.spiffe.io: true`` (as SPIRE: a request
   relayed by something that is not a Workload API client is refused);
3. the per-uid rate limit (and, for streams, the per-uid stream limit);
4. attestation through the plugin catalog, reused for a short while per
   connection, then the caller's pidfd is checked again: a caller that exited
   before or during attestation is denied (its PID could already be another
   process's).

Callers get a generic status; the log gets the reason, with pid and uid.
The socket file is 0666 like SPIRE's: any local process may *ask*; what it gets
is decided by attestation, not by the file mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError
from grpclib.const import Cardinality, Handler, Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError
from grpclib.server import Server, Stream

from custos.errors import CustosError
from custos.identity.selector import Selector
from custos.jwtsvid.errors import JwtSvidError
from custos.keys.errors import KeyStoreError
from custos.plugin.catalog import AgentCatalog
from custos.wimse.errors import WimseError

from .limits import RateLimiter, StreamCounter, WorkloadApiLimits
from .peer import DEFAULT_MAX_CONNECTIONS_PER_UID, Caller, CallerSocket
from .sources import IdentitySource, ServedIdentity, WorkloadAttestation

log = logging.getLogger(__name__)

#: The metadata every SPIFFE Workload API request must carry.
SECURITY_HEADER = "workload.spiffe.io"
#: The upstream service name: no proto package (ours has one; mapped here).
SPIFFE_SERVICE = "SpiffeWorkloadAPI"
SIGNING_SERVICE = "custos.wimse.v1.WimseSigning"


class WorkloadSocketError(CustosError):
    """The Workload API socket cannot be created (path taken, in use, unsafe directory)."""

    code = "workload_socket"


# -- statuses callers see (the log has the detail) ---------------------------------

def denied(message: str = "permission denied") -> GRPCError:
    return GRPCError(Status.PERMISSION_DENIED, message)


NO_IDENTITY = "no identity issued"
#: The status message of calls that close() ended or refused.
SHUTTING_DOWN = "the agent is shutting down"
#: How long close() lets unary calls in flight finish before it cancels them.
DEFAULT_CLOSE_GRACE = 2.0


@dataclass(frozen=True)
class Call:
    """One attested call: who, and the selectors attestation gave."""

    method: str
    caller: Caller
    selectors: tuple[Selector, ...]

    def __str__(self) -> str:
        return f"{self.method} from pid {self.caller.pid} uid {self.caller.uid}"


Impl = Callable[[Stream[Any, Any], Call], Awaitable[None]]


class _LimitedCodec(ProtoCodec):
    """grpclib 0.4 has no max_message_size: an oversized request is refused here,
    before it is parsed (decision 0045 says what this does not bound)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit

    def decode(self, data: bytes, message_type: Any) -> Any:
        if len(data) > self._limit:
            log.warning("workload API: a %d-byte request refused (limit %d)", len(data),
                        self._limit)
            raise GRPCError(Status.RESOURCE_EXHAUSTED, "request message too large")
        try:
            return super().decode(data, message_type)
        except DecodeError:
            log.info("workload API: a request that does not parse as %s refused",
                     message_type.DESCRIPTOR.name)
            raise GRPCError(Status.INVALID_ARGUMENT, "malformed request message") from None


async def request_of(stream: Stream[Any, Any]) -> Any:
    """The call's one request message; a call that sends none is INVALID_ARGUMENT."""
    request = await stream.recv_message()
    if request is None:
        raise GRPCError(Status.INVALID_ARGUMENT, "request message missing")
    return request


class _Calls:
    """The gate every handler runs behind, and the identities it may serve."""

    def __init__(
        self, identities: IdentitySource, catalog: WorkloadAttestation, limits: WorkloadApiLimits
    ) -> None:
        self.identities = identities
        self._catalog = catalog
        self._limits = limits
        self._rate = RateLimiter(limits.requests_per_second, limits.burst)
        self._streams = StreamCounter(limits.max_streams_per_uid)
        #: Set by drain(): every call from then on is UNAVAILABLE.
        self.closing = False
        #: The task of every call being handled, and whether it is a stream.
        self._inflight: dict[asyncio.Task[Any], bool] = {}
        #: Tasks drain() cancelled: their cancellation becomes UNAVAILABLE.
        self._stopping: set[asyncio.Task[Any]] = set()

    # -- the gate ------------------------------------------------------------------

    def _caller(self, stream: Stream[Any, Any], method: str, *, spiffe: bool) -> Caller:
        caller = stream.peer.addr()
        if not isinstance(caller, Caller):
            log.warning("workload API: %s refused: the caller's credentials are unknown", method)
            raise denied()
        if spiffe and dict(stream.metadata or {}).get(SECURITY_HEADER) != "true":
            log.info("workload API: %s from pid %d refused: no %s header", method, caller.pid,
                     SECURITY_HEADER)
            raise GRPCError(Status.INVALID_ARGUMENT, "security header missing from request")
        if not self._rate.allow(caller.uid):
            if self._rate.first_refusal(caller.uid):
                log.warning("workload API: %s from pid %d refused: uid %d over its rate limit "
                            "(further refusals are not logged until it is allowed again)",
                            method, caller.pid, caller.uid)
            raise GRPCError(Status.RESOURCE_EXHAUSTED, "rate limit exceeded")
        return caller

    async def _attest(self, caller: Caller, method: str) -> tuple[Selector, ...]:
        if caller.exited():
            log.warning("workload API: %s refused: pid %d exited before attestation", method,
                        caller.pid)
            raise denied()
        max_age = self._limits.attestation_cache_seconds
        selectors = caller.cached_selectors(max_age)
        if selectors is not None:  # fresh: no lock to take (one event loop)
            return selectors
        # One attestation at a time per connection; concurrent calls on it share it.
        async with caller.lock:
            selectors = caller.cached_selectors(max_age)
            if selectors is None:
                selectors = await self._run_attestors(caller, method)
                if caller.exited():
                    log.warning("workload API: %s refused: pid %d exited during attestation",
                                method, caller.pid)
                    raise denied()
                caller.remember(selectors)
        return selectors

    async def _run_attestors(self, caller: Caller, method: str) -> tuple[Selector, ...]:
        try:
            return await self._catalog.attest_workload(caller.credentials)
        except CustosError as e:
            if caller.exited():
                log.warning("workload API: %s refused: pid %d exited during attestation "
                            "(%s)", method, caller.pid, e.code)
                raise denied() from None
            log.error("workload API: %s from pid %d: workload attestation failed: [%s] %s",
                      method, caller.pid, e.code, e.message)
            raise GRPCError(Status.INTERNAL, "workload attestation failed") from None

    def handler(self, method: str, impl: Impl, *, spiffe: bool, streaming: bool,
                attest: bool = True) -> Callable[[Stream[Any, Any]], Awaitable[None]]:
        async def run(stream: Stream[Any, Any]) -> None:
            if self.closing:
                raise GRPCError(Status.UNAVAILABLE, SHUTTING_DOWN)
            caller = self._caller(stream, method, spiffe=spiffe)
            task = asyncio.current_task()
            if task is not None:
                self._inflight[task] = streaming
            counted = False
            try:
                if streaming:
                    if not self._streams.acquire(caller.uid):
                        log.warning("workload API: %s from pid %d refused: uid %d has too "
                                    "many streams open", method, caller.pid, caller.uid)
                        raise GRPCError(Status.RESOURCE_EXHAUSTED, "too many streams")
                    counted = True
                selectors = await self._attest(caller, method) if attest else ()
                await impl(stream, Call(method, caller, selectors))
            except GRPCError:
                raise
            except CustosError as e:
                status, message = status_for(e)
                log.info("workload API: %s from pid %d: %s [%s] %s", method, caller.pid,
                         status.name, e.code, e.message)
                raise GRPCError(status, message) from None
            except asyncio.CancelledError:
                if task is not None and task in self._stopping:
                    # Cancelled by drain(), not by the caller: answer with a status.
                    task.uncancel()
                    log.info("workload API: %s from pid %d ended: the agent is shutting "
                             "down", method, caller.pid)
                    raise GRPCError(Status.UNAVAILABLE, SHUTTING_DOWN) from None
                raise
            except GeneratorExit:
                raise
            except Exception:
                log.exception("workload API: %s from pid %d failed", method, caller.pid)
                raise GRPCError(Status.INTERNAL, "internal error") from None
            finally:
                if task is not None:
                    self._inflight.pop(task, None)
                    self._stopping.discard(task)
                if counted:
                    self._streams.release(caller.uid)

        return run

    # -- closing ----------------------------------------------------------------------

    def _stop(self, task: asyncio.Task[Any]) -> None:
        self._stopping.add(task)
        task.cancel()

    async def drain(self, grace: float) -> None:
        """Refuse new calls; end streams now; give unary calls ``grace`` seconds to
        finish, then end them. Every call ends with a status: its own, or
        UNAVAILABLE. Returns once every call's task is done (its trailers written)."""
        self.closing = True
        for task, streaming in list(self._inflight.items()):
            if streaming:  # a stream never ends by itself
                self._stop(task)
        pending = set(self._inflight)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=max(grace, 0.0))
        for task in pending:
            self._stop(task)
        if pending:
            # A handler stuck where cancellation cannot reach (it swallows it) is
            # left to the transport's close below, after a bounded wait.
            _, stuck = await asyncio.wait(pending, timeout=5.0)
            if stuck:
                log.warning("workload API: %d calls did not end when cancelled", len(stuck))

    # -- what a call may be served --------------------------------------------------

    def entitled(self, call: Call) -> list[ServedIdentity]:
        """Every identity of the caller, the default first; none is PERMISSION_DENIED."""
        found = list(self.identities.identities_for(call.selectors))
        if not found:
            log.info("workload API: %s: no identity for selectors %s", call,
                     [str(s) for s in call.selectors])
            raise denied(NO_IDENTITY)
        return found

    def alive(self, call: Call) -> None:
        """Before a response leaves: the caller must still be the process that asked."""
        if call.caller.exited():
            log.warning("workload API: %s refused: the caller exited", call)
            raise denied()


def unique_hints(call: Call, identities: list[ServedIdentity]) -> list[ServedIdentity]:
    """The identities of one response with each non-empty hint once (SPIFFE Workload
    API: servers MUST): of two with one hint, the first by entry id is served."""
    kept: list[ServedIdentity] = []
    hints: set[str] = set()
    for identity in identities:
        if identity.hint and identity.hint in hints:
            log.warning("workload API: %s: entry %s not served: its hint %r is already "
                        "another identity's", call, identity.entry_id, identity.hint)
            continue
        hints.add(identity.hint)
        kept.append(identity)
    return kept


def status_for(error: CustosError) -> tuple[Status, str]:
    """The status and the caller's one-line message for a custos error from a handler."""
    if isinstance(error, KeyStoreError):
        return Status.UNAVAILABLE, "signing key unavailable"
    if isinstance(error, WimseError | JwtSvidError) or isinstance(error, ValueError):
        # The caller's own input was refused: its code and message help it and
        # carry nothing of anyone else's.
        text = " ".join(error.message.split())[:200]
        return Status.INVALID_ARGUMENT, f"{error.code}: {text}"
    return Status.UNAVAILABLE, "credentials unavailable"


def method_handler(
    calls: _Calls, service: str, name: str, impl: Impl, request: type, reply: type, *,
    streaming: bool, spiffe: bool, attest: bool = True,
) -> tuple[str, Handler]:
    path = f"/{service}/{name}"
    run = calls.handler(path, impl, spiffe=spiffe, streaming=streaming, attest=attest)
    cardinality = Cardinality.UNARY_STREAM if streaming else Cardinality.UNARY_UNARY
    return path, Handler(run, cardinality, request, reply)


class _Service:
    """A grpclib servicer made of explicit ``path -> Handler`` entries."""

    def __init__(self, mapping: dict[str, Handler]) -> None:
        self._mapping = mapping

    def __mapping__(self) -> dict[str, Handler]:
        return self._mapping


# -- the socket ------------------------------------------------------------------------

def _in_use(path: Path) -> bool:
    """Whether something answers on the socket file at ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError as e:
        raise WorkloadSocketError(f"cannot tell whether {path} is in use: {e}") from e
    finally:
        probe.close()
    return True


def _bind(sock: socket.socket, path: Path) -> None:
    """Bind at ``path``; a socket file left by an agent that is gone is replaced,
    a live one or anything that is not a socket is not."""
    try:
        sock.bind(str(path))
        return
    except OSError as e:
        if e.errno != errno.EADDRINUSE:
            raise WorkloadSocketError(f"cannot create the Workload API socket {path}: {e}") from e
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise WorkloadSocketError(f"{path} exists and is not a socket; not replacing it")
    if _in_use(path):
        raise WorkloadSocketError(
            f"{path} is in use by a running agent", code="workload_socket_in_use"
        )
    log.info("workload API: replacing the stale socket %s", path)
    path.unlink(missing_ok=True)
    sock.bind(str(path))


def listening_socket(
    path: Path, max_connections_per_uid: int = DEFAULT_MAX_CONNECTIONS_PER_UID
) -> CallerSocket:
    """Bound at ``path`` with mode 0666, its directory created 0755 if missing."""
    sock = CallerSocket(max_connections_per_uid)
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        _bind(sock, path)
        # Everyone may connect (as SPIRE's socket): authorization is attestation.
        os.chmod(path, 0o666)  # noqa: S103 -- decision 0044
    except OSError as e:
        sock.close()
        raise WorkloadSocketError(f"cannot create the Workload API socket {path}: {e}") from e
    except BaseException:
        sock.close()
        raise
    return sock


class WorkloadApiServer:
    """A running Workload API; :meth:`close` stops it and removes the socket file."""

    def __init__(self, server: Server, socket_path: Path, calls: _Calls | None = None,
                 listener: CallerSocket | None = None) -> None:
        self._server = server
        self.socket_path = socket_path
        self._calls = calls
        self._listener = listener
        self._closed: asyncio.Future[None] | None = None

    async def close(self, grace: float = DEFAULT_CLOSE_GRACE) -> None:
        """Stop serving, and leave no connection served (decision 0076).

        New calls, on new or open connections, are UNAVAILABLE at once; streams end
        with UNAVAILABLE; unary calls in flight get ``grace`` seconds to finish,
        then UNAVAILABLE. Then every open connection is closed (the client sees
        the connection end, as from a stopped agent), the listener stops and the
        socket file is removed. A second call waits for the first.
        """
        if self._closed is not None:
            await asyncio.shield(self._closed)
            return
        self._closed = asyncio.get_running_loop().create_future()
        try:
            if self._calls is not None:
                await self._calls.drain(grace)
            if self._listener is not None:
                await self._listener.close_connections()
            self._server.close()
            await self._server.wait_closed()
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
        finally:
            self._closed.set_result(None)


async def serve_workload_api(
    socket_path: Path,
    *,
    identities: IdentitySource,
    catalog: AgentCatalog | WorkloadAttestation,
    limits: WorkloadApiLimits | None = None,
    max_connections_per_uid: int | None = None,
) -> WorkloadApiServer:
    """Serve the SPIFFE Workload API and ``custos.wimse.v1.WimseSigning`` on ``socket_path``.

    ``limits.max_connections_per_uid`` (default 256) bounds the connections one uid
    holds open; the ``max_connections_per_uid`` argument, kept for callers from before
    it was a limit, overrides it (validated the same way).
    """
    from .signing import signing_handlers
    from .spiffe import spiffe_handlers

    limits = limits if limits is not None else WorkloadApiLimits()
    if max_connections_per_uid is not None:
        limits = dataclasses.replace(limits, max_connections_per_uid=max_connections_per_uid)
    calls = _Calls(identities, catalog, limits)
    services = [_Service(spiffe_handlers(calls)), _Service(signing_handlers(calls))]
    server = Server(services, codec=_LimitedCodec(limits.max_message_bytes))
    path = Path(socket_path)
    sock = listening_socket(path, limits.max_connections_per_uid)
    with contextlib.ExitStack() as undo:  # undone if the server does not start
        undo.callback(path.unlink, missing_ok=True)
        undo.callback(sock.close)
        await server.start(sock=sock)
        undo.pop_all()
    log.info("workload API listening on %s", path)
    return WorkloadApiServer(server, path, calls, sock)


__all__ = [
    "DEFAULT_CLOSE_GRACE",
    "NO_IDENTITY",
    "SECURITY_HEADER",
    "SHUTTING_DOWN",
    "SIGNING_SERVICE",
    "SPIFFE_SERVICE",
    "Call",
    "WorkloadApiServer",
    "WorkloadSocketError",
    "request_of",
    "serve_workload_api",
    "unique_hints",
]
