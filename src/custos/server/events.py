"""Change events: when the entries or the bundle may have changed (decision 10, 0037).

:class:`ChangeEvents` keeps two generation counters, one for registration
entries and one for the trust bundle.  Anything that may have changed one
bumps its counter; the Agent API streams wait for the counter to move past the
value they last acted on, then read the datastore again and send only if what
the agent gets really changed.  A counter never says *what* changed, so a
spurious bump costs one read and nothing else, and bumps that arrive together
are handled by one read.

Sources of bumps:

* local writes: the admin API calls :meth:`ChangeEvents.entries_changed`, the
  app :meth:`ChangeEvents.bundle_changed` after a key is published or pruned;
* PostgreSQL: every entry write and signing-key change sends
  ``pg_notify('custos_entries' | 'custos_bundle', ...)`` in its own transaction,
  so other servers sharing the database hear of it when (and only if) it
  commits.  A background task LISTENs on its own psycopg connection and
  reconnects with backoff when that connection drops; after each (re)connect
  both counters are bumped, as a notification may have been missed meanwhile;
* a slow safety poll (``poll_interval``, 5 s by default) of the entry change
  feed and of the signing keys: it heals a missed notification, and on SQLite
  it is how writes by another process on the same file are seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable

from custos._numbers import seconds
from custos.server.datastore.database import parse_url
from custos.server.datastore.errors import DatastoreError
from custos.server.datastore.signing_keys import PURPOSES
from custos.server.datastore.store import Datastore

log = logging.getLogger(__name__)

#: The PostgreSQL channels the datastore notifies on.
ENTRIES_CHANNEL = "custos_entries"
BUNDLE_CHANNEL = "custos_bundle"
#: The LISTEN connection's application_name (visible in pg_stat_activity).
LISTEN_APPLICATION_NAME = "custos-server-events"
#: Default seconds between safety polls of the datastore.
DEFAULT_POLL_INTERVAL = 5.0
#: Reconnect delays of the LISTEN connection: doubling from the first to the last.
RECONNECT_FIRST = 0.1
RECONNECT_MAX = 5.0
#: How long start() waits for the first LISTEN before going on without it
#: (the task keeps trying; the safety poll covers the gap).
_FIRST_LISTEN_WAIT = 10.0


class ChangeEvents:
    """Entry and bundle generation counters, fed by local calls, PostgreSQL
    notifications and a safety poll.

    :meth:`entries_changed` and :meth:`bundle_changed` may be called from any
    thread; the ``wait_*`` coroutines run on the server's event loop.
    """

    def __init__(
        self,
        datastore: Datastore,
        database_url: str,
        *,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
    ) -> None:
        self._datastore = datastore
        parsed = parse_url(database_url)
        #: libpq connection string of the LISTEN connection (may hold a password:
        #: never logged), None on SQLite.
        self._conninfo: str | None = (
            parsed.set(drivername="postgresql").render_as_string(hide_password=False)
            if parsed.get_backend_name() == "postgresql"
            else None
        )
        self.poll_interval = seconds(poll_interval, name="poll_interval", minimum=0.01)
        self._lock = threading.Lock()
        self._entries = 0
        self._bundle = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._listening = asyncio.Event()
        #: How many times the LISTEN connection was (re)established (tests, logs).
        self.listen_connects = 0
        self._seen_seq: int | None = None
        self._seen_keys: tuple[tuple[str, str], ...] | None = None

    # -- generations ----------------------------------------------------------

    @property
    def entries_generation(self) -> int:
        return self._entries

    @property
    def bundle_generation(self) -> int:
        return self._bundle

    def entries_changed(self) -> None:
        """The entries may have changed (a local write, a notification, the poll)."""
        with self._lock:
            self._entries += 1
        self._wake()

    def bundle_changed(self) -> None:
        """The bundle's keys may have changed (published, activated or pruned)."""
        with self._lock:
            self._bundle += 1
        self._wake()

    async def wait_entries(self, seen: int) -> int:
        """Return the entry generation once it is above ``seen``."""
        return await self._wait(lambda: self._entries, seen)

    async def wait_bundle(self, seen: int) -> int:
        """Return the bundle generation once it is above ``seen``."""
        return await self._wait(lambda: self._bundle, seen)

    async def _wait(self, current: Callable[[], int], seen: int) -> int:
        self._loop = asyncio.get_running_loop()
        while True:
            # Take the event before reading the counter: a bump in between sets
            # this very event, so it cannot be lost.
            event = self._wakeup
            now = current()
            if now > seen:
                return now
            await event.wait()

    def _wake(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return  # nobody has waited yet; waiters read the counters first
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._set_wakeup()
        else:
            loop.call_soon_threadsafe(self._set_wakeup)

    def _set_wakeup(self) -> None:
        # Broadcast: wake every current waiter, and give later ones a fresh event.
        event, self._wakeup = self._wakeup, asyncio.Event()
        event.set()

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Start the safety poll, and on PostgreSQL the LISTEN task; returns once
        the first LISTEN is in place (or has failed once; it is retried)."""
        if self._tasks:
            return
        self._loop = asyncio.get_running_loop()
        # The poll's baseline is taken now, not in the task: a write landing after
        # start() returns must differ from it, whenever the task first runs.
        await self._poll_logged()
        self._tasks.append(asyncio.create_task(self._poll_forever(), name="custos-events-poll"))
        if self._conninfo is None:
            return
        first = asyncio.Event()
        self._tasks.append(
            asyncio.create_task(self._listen_forever(first), name="custos-events-listen")
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(first.wait(), _FIRST_LISTEN_WAIT)

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def wait_listening(self) -> None:
        """Return once the LISTEN connection is up (PostgreSQL only; tests use it)."""
        await self._listening.wait()

    # -- PostgreSQL LISTEN ------------------------------------------------------

    async def _listen_forever(self, first: asyncio.Event) -> None:
        import psycopg  # the server extra; only PostgreSQL URLs get here

        assert self._conninfo is not None
        delay = RECONNECT_FIRST
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._conninfo,
                    autocommit=True,
                    connect_timeout=5,
                    application_name=LISTEN_APPLICATION_NAME,
                    # A connection that dies without a word (a partition, a dropped
                    # NAT entry) is noticed in about a minute, not never: idle
                    # LISTEN connections send nothing of their own.
                    keepalives=1,
                    keepalives_idle=30,
                    keepalives_interval=10,
                    keepalives_count=3,
                )
                async with conn:
                    await conn.execute(f"LISTEN {ENTRIES_CHANNEL}")
                    await conn.execute(f"LISTEN {BUNDLE_CHANNEL}")
                    self.listen_connects += 1
                    self._listening.set()
                    first.set()
                    delay = RECONNECT_FIRST
                    # Whatever was written while we were not listening was not
                    # heard: have every stream look again.
                    self.entries_changed()
                    self.bundle_changed()
                    async for note in conn.notifies():
                        if note.channel == ENTRIES_CHANNEL:
                            self.entries_changed()
                        elif note.channel == BUNDLE_CHANNEL:
                            self.bundle_changed()
            except (psycopg.Error, OSError) as exc:
                log.warning(
                    "change notifications: the PostgreSQL LISTEN connection failed (%s); "
                    "reconnecting in %.1f s",
                    str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc),
                    delay,
                )
            self._listening.clear()
            first.set()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX)

    # -- safety poll ----------------------------------------------------------

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            await self._poll_logged()

    async def _poll_logged(self) -> None:
        try:
            await asyncio.to_thread(self.poll_once)
        except DatastoreError as exc:
            log.warning("change notifications: safety poll failed: %s", exc)

    def poll_once(self) -> None:
        """Compare the entry change feed and the signing keys with the last poll
        and bump what moved (blocking: the datastore is synchronous)."""
        seq = self._datastore.entries.last_change_seq()
        keys = tuple(
            (r.kid, r.status)
            for purpose in PURPOSES
            for r in self._datastore.signing_keys.of_purpose(purpose)
        )
        seen_seq, self._seen_seq = self._seen_seq, seq
        seen_keys, self._seen_keys = self._seen_keys, keys
        if seen_seq is not None and seq != seen_seq:
            self.entries_changed()
        if seen_keys is not None and keys != seen_keys:
            self.bundle_changed()
