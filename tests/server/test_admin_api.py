"""The admin API over its Unix socket: a real custos server (custos.server.app, the
rig's configuration) answering AdminClient calls, the caller's kernel uid checked,
errors as one-line statuses, the socket file's life cycle."""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import os
import socket
import stat
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from custos._proto import types_v1_pb2
from custos.bundle import TrustBundle
from custos.identity import Selector, SpiffeId
from custos.server.admin import AdminServer, AdminSocketError, serve_admin
from custos.server.admin.client import AdminApiError, AdminClient, AdminUnreachableError
from custos.server.app import Server
from custos.server.config import AdminConfig, ServerConfig
from custos.server.wire import bundle_from_proto
from custos.testing.postgres import PostgresServer
from custos.testing.server import ServerRig, running_server

T = TypeVar("T")
NOBODY = 65534
TD = "example.org"
WORKLOAD = f"spiffe://{TD}/w"
AGENT = f"spiffe://{TD}/custos/agent/join_token/n1"


class ServerThread:
    """The real server (``custos.server.app.Server``) on its own event loop in a
    thread, so that tests and the CLI (``asyncio.run``) call it as any client does."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._server: Server | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            async with running_server(self.config) as srv:
                self._server = srv
                self._ready.set()
                await self._stop.wait()
        except Exception as e:  # noqa: BLE001  # handed to the test thread, raised there
            self._error = e
            self._ready.set()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        assert self._ready.wait(120), "the server did not start"
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)

    @property
    def server(self) -> Server:
        assert self._server is not None
        return self._server

    @property
    def socket(self) -> str:
        return str(self.config.admin.socket)

    def call(self, use: Callable[[AdminClient], Awaitable[T]]) -> T:
        """One admin client, one call sequence, from this (the test's) thread."""

        async def go() -> T:
            async with AdminClient(self.socket) as client:
                return await use(client)

        return asyncio.run(go())


@pytest.fixture(scope="module")
def running() -> Iterator[ServerThread]:
    rig = ServerRig.create()
    try:
        with ServerThread(rig.config()) as thread:
            yield thread
    finally:
        rig.destroy()


def _entry(**fields: Any) -> types_v1_pb2.Entry:
    values: dict[str, Any] = {
        "spiffe_id": WORKLOAD,
        "parent_id": AGENT,
        "selectors": ["unix:uid:1001"],
    }
    values.update(fields)
    return types_v1_pb2.Entry(**values)


def _refused(running: ServerThread, use: Callable[[AdminClient], Awaitable[Any]]) -> AdminApiError:
    with pytest.raises(AdminApiError) as info:
        running.call(use)
    return info.value


# -- entries ---------------------------------------------------------------------------


def test_entry_life_cycle(running: ServerThread) -> None:
    events = running.server.ctx.events
    before = events.entries_generation
    created = running.call(lambda c: c.create_entry(_entry(spiffe_id=f"{WORKLOAD}/cycle")))
    assert created.revision == 1
    assert events.entries_generation > before
    # TTLs not given are the server's defaults (server.toml).
    config = running.config
    assert created.x509_svid_ttl == config.x509_svid.default_ttl.total_seconds()
    assert created.jwt_svid_ttl == config.jwt_svid.default_ttl.total_seconds()
    assert created.wit_ttl == config.wit.default_ttl.total_seconds()
    assert running.call(lambda c: c.get_entry(created.id)) == created

    changed = types_v1_pb2.Entry()
    changed.CopyFrom(created)
    changed.x509_svid_ttl = 7200
    changed.hint = "web"
    updated = running.call(lambda c: c.update_entry(changed))
    assert (updated.revision, updated.x509_svid_ttl, updated.hint) == (2, 7200, "web")

    # A writer that read revision 1 is refused, and nothing changes.
    stale = _refused(running, lambda c: c.update_entry(changed))
    assert (stale.status, stale.code) == (Status.ABORTED, "revision_conflict")
    stale = _refused(running, lambda c: c.delete_entry(created.id, revision=1))
    assert stale.status == Status.ABORTED
    assert running.call(lambda c: c.get_entry(created.id)).revision == 2

    running.call(lambda c: c.delete_entry(created.id, revision=2))
    gone = _refused(running, lambda c: c.get_entry(created.id))
    assert (gone.status, gone.code) == (Status.NOT_FOUND, "entry_not_found")


def test_an_identical_entry_is_already_exists(running: ServerThread) -> None:
    twin = _entry(spiffe_id=f"{WORKLOAD}/twin", selectors=["unix:uid:1", "unix:gid:2"])
    first = running.call(lambda c: c.create_entry(twin))
    del twin.selectors[:]
    twin.selectors.extend(["unix:gid:2", "unix:uid:1"])  # the same set
    again = _refused(running, lambda c: c.create_entry(twin))
    assert (again.status, again.code) == (Status.ALREADY_EXISTS, "entry_exists")
    assert first.id in again.message
    other = running.call(lambda c: c.create_entry(_entry(spiffe_id=f"{WORKLOAD}/twin")))
    other.selectors[:] = ["unix:gid:2", "unix:uid:1"]
    made_twin = _refused(running, lambda c: c.update_entry(other))
    assert (made_twin.status, made_twin.code) == (Status.ALREADY_EXISTS, "entry_exists")


def test_the_servers_dns_name_is_reserved_whatever_case_the_config_wrote() -> None:
    rig = ServerRig.create(sections={"agent_api": {"dns_name": "Custos-Server"}})
    try:
        with ServerThread(rig.config()) as upper:
            refused = _refused(upper, lambda c: c.create_entry(_entry(dns_names=["custos-server"])))
    finally:
        rig.destroy()
    assert refused.code == "reserved_dns_name"
    assert "'custos-server'" in refused.message


def test_update_needs_the_revision_it_read(running: ServerThread) -> None:
    created = running.call(lambda c: c.create_entry(_entry(spiffe_id=f"{WORKLOAD}/norev")))
    created.revision = 0
    refused = _refused(running, lambda c: c.update_entry(created))
    assert (refused.status, refused.code) == (Status.INVALID_ARGUMENT, "revision_required")


def test_list_filters_and_count(running: ServerThread) -> None:
    parent = f"spiffe://{TD}/custos/agent/join_token/listing"
    a = running.call(lambda c: c.create_entry(_entry(parent_id=parent, selectors=["unix:uid:1"])))
    b = running.call(
        lambda c: c.create_entry(_entry(parent_id=parent, selectors=["unix:uid:1", "unix:gid:2"]))
    )
    assert {e.id for e in running.call(lambda c: c.list_entries(parent_id=parent))} == {a.id, b.id}
    exact = running.call(lambda c: c.list_entries(parent_id=parent, selectors=("unix:uid:1",)))
    assert [e.id for e in exact] == [a.id]
    superset = running.call(
        lambda c: c.list_entries(parent_id=parent, selectors=("unix:uid:1",), match="superset")
    )
    assert {e.id for e in superset} == {a.id, b.id}
    assert running.call(lambda c: c.count_entries()) == running.server.ctx.datastore.entries.count()
    bad = _refused(running, lambda c: c.list_entries(match="most"))
    assert (bad.status, bad.code) == (Status.INVALID_ARGUMENT, "invalid_match")


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"spiffe_id": "spiffe://other.org/w"}, "wrong_trust_domain"),
        ({"parent_id": "spiffe://other.org/agent"}, "wrong_trust_domain"),
        ({"spiffe_id": "not a uri"}, "invalid_identifier"),
        ({"selectors": ["no-colon"]}, "invalid_selector"),
        ({"selectors": []}, "no_selectors"),
        ({"x509_svid_ttl": -5}, "invalid_number"),
        ({"dns_names": ["custos-server"]}, "reserved_dns_name"),
        ({"dns_names": ["CUSTOS-Server"]}, "reserved_dns_name"),
        ({"dns_names": ["bad..name"]}, "invalid_dns_name"),
        ({"spiffe_id": f"spiffe://{TD}/custos/agent/join_token/x"}, "reserved_spiffe_id"),
        ({"spiffe_id": f"spiffe://{TD}/custos/server"}, "reserved_spiffe_id"),
        ({"key_custody": "cloud"}, "unknown_key_custody"),
    ],
)
def test_bad_entries_are_refused_and_nothing_is_written(
    running: ServerThread, fields: dict[str, Any], code: str
) -> None:
    count = running.server.ctx.datastore.entries.count()
    refused = _refused(running, lambda c: c.create_entry(_entry(**fields)))
    assert refused.status == Status.INVALID_ARGUMENT
    assert refused.code.startswith(code) or refused.code == code, refused
    assert "\n" not in refused.message
    assert running.server.ctx.datastore.entries.count() == count


def test_an_update_cannot_sneak_in_the_server_dns_name(running: ServerThread) -> None:
    created = running.call(lambda c: c.create_entry(_entry(spiffe_id=f"{WORKLOAD}/dns")))
    created.dns_names.append("custos-server")
    refused = _refused(running, lambda c: c.update_entry(created))
    assert refused.code == "reserved_dns_name"
    assert list(running.call(lambda c: c.get_entry(created.id)).dns_names) == []


# -- join tokens -------------------------------------------------------------------------


def test_token_defaults_to_ten_minutes_and_names_its_agent(running: ServerThread) -> None:
    made = running.call(lambda c: c.generate_token())
    stored = running.server.ctx.datastore.join_tokens.get(made.token_id)
    assert stored.expires_at - stored.created_at == 600
    assert made.agent_id == f"spiffe://{TD}/custos/agent/join_token/{made.token_id}"
    assert not made.HasField("alias")
    # The secret is the one the datastore consumes (the join_token attestor's path).
    assert running.server.ctx.datastore.join_tokens.consume(made.token).id == made.token_id


def test_token_with_spiffe_id_makes_the_alias_entry(running: ServerThread) -> None:
    node = f"spiffe://{TD}/node/alias"
    made = running.call(lambda c: c.generate_token(ttl=3600, spiffe_id=node))
    alias = running.server.ctx.datastore.entries.get(made.alias.id)
    assert alias.spiffe_id == SpiffeId.parse(node)
    assert str(alias.parent_id) == made.agent_id
    assert alias.selectors == (Selector("spiffe_id", made.agent_id),)
    stored = running.server.ctx.datastore.join_tokens.get(made.token_id)
    assert stored.expires_at - stored.created_at == 3600


@pytest.mark.parametrize(
    ("ttl", "spiffe_id", "code"),
    [
        (-1, "", "invalid_number"),
        (86401, "", "invalid_number"),
        (0, "spiffe://other.org/node", "wrong_trust_domain"),
        (0, f"spiffe://{TD}/custos/agent/x", "reserved_spiffe_id"),
    ],
)
def test_bad_token_requests(running: ServerThread, ttl: int, spiffe_id: str, code: str) -> None:
    entries = running.server.ctx.datastore.entries.count()
    refused = _refused(running, lambda c: c.generate_token(ttl=ttl, spiffe_id=spiffe_id))
    assert (refused.status, refused.code) == (Status.INVALID_ARGUMENT, code)
    assert running.server.ctx.datastore.entries.count() == entries


# -- agents, bundle, keys ----------------------------------------------------------------


def test_agents_list_show_evict_ban(running: ServerThread) -> None:
    agents = running.server.ctx.datastore.agents
    agent_id = f"spiffe://{TD}/custos/agent/join_token/admin-test"
    agents.attested(
        agent_id, attestor="join_token", selectors=["join_token:x"], serial="1", expires_at=2e9
    )
    listed = running.call(lambda c: c.list_agents())
    assert agent_id in [a.id for a in listed]
    shown = running.call(lambda c: c.get_agent(agent_id))
    assert (shown.attestor, list(shown.selectors), shown.evicted) == (
        "join_token",
        ["join_token:x"],
        False,
    )
    assert running.call(lambda c: c.evict_agent(agent_id)).evicted
    banned = running.call(lambda c: c.ban_agent(agent_id))
    assert banned.banned and banned.evicted
    assert agents.get(agent_id).banned
    missing = _refused(running, lambda c: c.get_agent(f"spiffe://{TD}/custos/agent/x/none"))
    assert (missing.status, missing.code) == (Status.NOT_FOUND, "agent_not_found")
    malformed = _refused(running, lambda c: c.evict_agent("agent-1"))
    assert malformed.status == Status.INVALID_ARGUMENT


def test_bundle_is_the_servers(running: ServerThread) -> None:
    message = running.call(lambda c: c.get_bundle())
    ctx = running.server.ctx
    assert message.trust_domain == TD
    got = bundle_from_proto(message)
    assert isinstance(got, TrustBundle)
    assert got.x509_authorities == ctx.bundle().x509_authorities
    assert {a.kid for a in got.jwt_authorities} == {a.kid for a in ctx.bundle().jwt_authorities}
    assert message.sequence_number == ctx.events.bundle_generation


def test_rotate_keys_makes_new_active_keys(running: ServerThread) -> None:
    ctx = running.server.ctx
    before = (ctx.ca_keys.current().kid, ctx.jwt_keys.current().kid, ctx.wit_keys.current().kid)
    generation = ctx.events.bundle_generation
    kids = running.call(lambda c: c.rotate_keys())
    now = [ctx.ca_keys.current().kid, ctx.jwt_keys.current().kid, ctx.wit_keys.current().kid]
    assert kids == now
    assert not set(kids) & set(before)
    assert ctx.events.bundle_generation > generation
    # The new keys are in the bundle the admin API (and the agents) get.
    published = {
        a.kid for a in bundle_from_proto(running.call(lambda c: c.get_bundle())).jwt_authorities
    }
    assert {now[1], now[2]} <= published


def test_calls_are_timed_by_method_and_status(running: ServerThread) -> None:
    running.call(lambda c: c.count_entries())
    registry = running.server.ctx.metrics.registry
    count = registry.get_sample_value(
        "custos_server_call_seconds_count",
        {"method": "/custos.admin.v1.Entries/CountEntries", "code": "OK"},
    )
    assert count is not None and count >= 1
    _refused(running, lambda c: c.get_entry("no-such-entry"))
    assert registry.get_sample_value(
        "custos_server_call_seconds_count",
        {"method": "/custos.admin.v1.Entries/GetEntry", "code": "NOT_FOUND"},
    )


# -- who may call ------------------------------------------------------------------------


def _as_nobody(path: str) -> tuple[str, str]:
    """Call CountEntries and the health check from a forked child running as
    ``nobody``: the uid the server sees is the kernel's, not anything we send.
    (A fork, not an exec: this interpreter lives where nobody cannot read.)"""
    ctx = multiprocessing.get_context("fork")
    parent_end, child_end = ctx.Pipe()

    def child() -> None:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)

        async def calls() -> tuple[str, str]:
            try:
                async with AdminClient(path, timeout=10) as client:
                    await client.count_entries()
                    admin = "OK"
            except AdminApiError as e:
                admin = f"{e.status.name} {e.code}"
            except AdminUnreachableError as e:
                admin = f"unreachable {e.message}"
            channel = Channel(path=path)
            try:
                reply = await HealthStub(channel).Check(HealthCheckRequest(service=""), timeout=10)
                health = HealthCheckResponse.ServingStatus.Name(reply.status)
            finally:
                channel.close()
            return admin, health

        child_end.send(asyncio.run(calls()))

    process = ctx.Process(target=child)
    process.start()
    try:
        assert parent_end.poll(60), "the child did not answer"
        result: tuple[str, str] = parent_end.recv()
        return result
    finally:
        process.join(10)


def _open_to_everyone(path: str) -> None:
    # The socket's mode is the outer fence; open it so that only the uid check decides.
    os.chmod(os.path.dirname(path), 0o755)
    os.chmod(path, 0o666)


def test_a_uid_not_allowed_is_refused_and_counted(running: ServerThread) -> None:
    _open_to_everyone(running.socket)
    assert _as_nobody(running.socket) == (
        "PERMISSION_DENIED admin_permission_denied",
        "SERVING",
    )
    assert running.server.ctx.metrics.registry.get_sample_value(
        "custos_server_call_seconds_count",
        {"method": "/custos.admin.v1.Entries/CountEntries", "code": "PERMISSION_DENIED"},
    )


def test_an_allowed_uid_passes(tmp_path: Path) -> None:
    rig = ServerRig.create(sections={"admin": {"allowed_uids": [NOBODY]}})
    try:
        with ServerThread(rig.config()) as running:
            # With other uids allowed, the socket is group-accessible (0660) and its
            # fresh directory passable (0711); here the rig made the directory.
            assert stat.S_IMODE(os.stat(running.socket).st_mode) == 0o660
            _open_to_everyone(running.socket)
            assert _as_nobody(running.socket) == ("OK", "SERVING")
    finally:
        rig.destroy()


# -- the socket file ---------------------------------------------------------------------


def _ctx_on(running: ServerThread, path: Path) -> Any:
    config = running.server.ctx.config.model_copy(update={"admin": AdminConfig(socket=path)})
    return dataclasses.replace(running.server.ctx, config=config)


def test_socket_is_private_and_removed_on_close(running: ServerThread, tmp_path: Path) -> None:
    path = tmp_path / "own" / "admin.sock"

    async def cycle() -> tuple[int, int, bool]:
        admin: AdminServer = await serve_admin(_ctx_on(running, path))
        modes = (
            stat.S_IMODE(path.stat().st_mode),
            stat.S_IMODE(path.parent.stat().st_mode),
        )
        await admin.close()
        return (*modes, path.exists())

    assert asyncio.run(cycle()) == (0o600, 0o700, False)


def test_stale_socket_is_replaced(running: ServerThread, tmp_path: Path) -> None:
    path = tmp_path / "admin.sock"
    os.chmod(tmp_path, 0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: a crashed server's socket

    async def start_and_count() -> int:
        admin = await serve_admin(_ctx_on(running, path))
        try:
            async with AdminClient(path) as client:
                return await client.count_entries()
        finally:
            await admin.close()

    assert asyncio.run(start_and_count()) >= 0


@pytest.mark.parametrize("what", ["file", "live socket", "shared directory"])
def test_refuses_a_path_it_must_not_take(running: ServerThread, tmp_path: Path, what: str) -> None:
    os.chmod(tmp_path, 0o700)
    path = tmp_path / "admin.sock"
    if what == "file":
        path.write_text("precious")
    elif what == "shared directory":
        os.chmod(tmp_path, 0o777)
    else:
        path = Path(running.socket)

    async def start() -> None:
        admin = await serve_admin(_ctx_on(running, path))
        await admin.close()

    with pytest.raises(AdminSocketError) as info:
        asyncio.run(start())
    if what == "file":
        assert path.read_text() == "precious"
    if what == "live socket":
        assert info.value.code == "admin_socket_in_use"
        assert running.call(lambda c: c.count_entries()) >= 0  # still served


# -- PostgreSQL ----------------------------------------------------------------------------


class TestOnPostgreSQL:
    @pytest.fixture
    def running(self, postgres_db: str) -> Iterator[ServerThread]:
        rig = ServerRig.create(datastore_url=postgres_db)
        try:
            with ServerThread(rig.config()) as thread:
                yield thread
        finally:
            rig.destroy()

    def test_entries_and_conflicts(self, running: ServerThread) -> None:
        created = running.call(lambda c: c.create_entry(_entry()))
        changed = types_v1_pb2.Entry()
        changed.CopyFrom(created)
        changed.selectors.append("unix:gid:7")
        updated = running.call(lambda c: c.update_entry(changed))
        assert list(updated.selectors) == ["unix:gid:7", "unix:uid:1001"]
        stale = _refused(running, lambda c: c.update_entry(changed))
        assert stale.status == Status.ABORTED
        listed = running.call(lambda c: c.list_entries(spiffe_id=WORKLOAD))
        assert [e.revision for e in listed] == [2]
        assert running.call(lambda c: c.count_entries()) == 1

    def test_database_gone_is_unavailable_and_counted(
        self, running: ServerThread, postgres: PostgresServer, postgres_db: str
    ) -> None:
        postgres.drop_database(postgres_db.rsplit("/", 1)[1])
        down = _refused(running, lambda c: c.count_entries())
        assert (down.status, down.code) == (Status.UNAVAILABLE, "datastore_unavailable")
        assert "\n" not in down.message
        assert running.server.ctx.metrics.registry.get_sample_value(
            "custos_server_datastore_errors_total",
            {"operation": "/custos.admin.v1.Entries/CountEntries"},
        )

    def test_token_alias_and_rotation(self, running: ServerThread) -> None:
        made = running.call(lambda c: c.generate_token(spiffe_id=f"spiffe://{TD}/node/pg"))
        assert running.call(lambda c: c.get_entry(made.alias.id)).parent_id == made.agent_id
        assert len(running.call(lambda c: c.rotate_keys())) == 3
