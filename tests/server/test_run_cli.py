"""``custos server run`` and ``custos server healthcheck`` as an operator runs them,
and the configuration keys the server added (each mistake: one line naming the key)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from cli_runner import run_custos
from custos.agent.client.calls import X509Params
from custos.server.admin.client import AdminClient
from custos.server.config import ServerConfigError, server_config_from_toml
from custos.server.datastore import Datastore
from custos.server.wire import bundle_from_proto
from custos.testing.server import (
    ServerProcess,
    ServerRig,
    ServerRigError,
    free_port,
    join_token_agent,
    new_csr,
)
from custos.testing.softhsm import SoftHSMToken

RigFactory = Callable[..., ServerRig]

KEYS = """
[ca]
key_name = "ca"
[ca.key_store]
store = "exportable"
key_dir = "/var/lib/custos/keys"
[jwt_svid]
key_name = "jwt"
[jwt_svid.key_store]
store = "exportable"
key_dir = "/var/lib/custos/keys"
[wit]
key_name = "wit"
[wit.key_store]
store = "exportable"
key_dir = "/var/lib/custos/keys"
"""
MINIMAL = 'trust_domain = "example.org"\n' + KEYS


@pytest.mark.parametrize(
    ("extra", "where"),
    [
        ('[agent_api]\ndns_name = "not a name"', "agent_api.dns_name:"),
        ('[agent_api]\ndns_name = "*.example.org"', "agent_api.dns_name:"),
        ("[agent_api]\ndns_name = 7", "agent_api.dns_name:"),
        ("[agent_api]\nmax_message_bytes = 10", "agent_api.max_message_bytes:"),
        ("[agent_api]\nmax_message_bytes = 1e9", "agent_api.max_message_bytes:"),
        ('[agent_api]\nmax_message_bytes = "4MiB"', "agent_api.max_message_bytes:"),
        ('[http]\naddress = "localhost"', "http.address:"),
        ('[http]\naddress = "127.0.0.1:0"', "http.address:"),
        ("[http]\nport = 1", "http.port: unknown key"),
        ('[federation]\naddress = "127.0.0.1:8443"', "federation:"),
        ('[federation]\naddress = "127.0.0.1:8443"\ncert_file = "c.pem"', "federation.cert_file:"),
        ('[federation]\nrefresh_hint = "0s"', "federation.refresh_hint:"),
        ('[join_token]\ndefault_ttl = "forever"', "join_token.default_ttl:"),
        ("[join_token]\ndefault_ttl = 0", "join_token.default_ttl:"),
        ('[events]\npoll_interval = "nan"', "events.poll_interval:"),
        ("[events]\npoll = 1", "events.poll: unknown key"),
        ("node_attestors = 3", "node_attestors:"),
        ("[node_attestors]\njoin_token = 1", "[node_attestors.join_token] must be a table"),
        ('[node_attestors.tpm]\nenabled = "yes"', "node_attestors.tpm.enabled must be"),
        ('[node_attestors."a\\nb"]\nenabled = "yes"', "node_attestors: a node attestor's name"),
        ('[node_attestors."a\\nb"]\nx = 1', "node_attestors: a node attestor's name"),
        ('[node_attestors."a b"]', "node_attestors: a node attestor's name"),
        ('[node_attestors.join_token]\ndatastore = "x"', "node_attestors.join_token.datastore"),
    ],
)
def test_a_bad_new_key_is_one_line_naming_it(extra: str, where: str) -> None:
    with pytest.raises(ServerConfigError) as info:
        server_config_from_toml(MINIMAL + extra, source="server.toml")
    message = info.value.message
    assert "\n" not in message
    assert message.startswith("server.toml: ")
    assert where in message


def test_the_new_keys_have_their_documented_defaults() -> None:
    config = server_config_from_toml(MINIMAL)
    assert config.agent_api.dns_name == "custos-server"
    assert config.agent_api.max_message_bytes == 4 * 1024 * 1024
    assert config.join_token.default_ttl.total_seconds() == 600
    assert config.http.address is None
    assert config.federation.address is None
    assert config.events.poll_interval.total_seconds() == 5
    assert config.node_attestor_settings() == {"join_token": {}}


def test_node_attestor_tables_give_settings_and_turn_join_token_off() -> None:
    config = server_config_from_toml(
        MINIMAL
        + '[node_attestors.join_token]\nenabled = false\n[node_attestors.acme]\nregion = "eu"\n'
    )
    assert config.node_attestor_settings() == {"acme": {"region": "eu"}}


def test_run_with_a_missing_config_is_one_line(tmp_path: Path) -> None:
    result = run_custos("server", "run", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 1
    assert result.stderr.startswith("error [server_config]: ")
    assert len(result.stderr.strip().splitlines()) == 1


def test_run_with_the_agent_api_port_taken_is_one_line(server_rig_factory: RigFactory) -> None:
    rig = server_rig_factory()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", rig.agent_api_port))
        taken.listen()
        # A first start (migrations run) at the default level: every line is one
        # custos record (no grpc C-core line, no multi-line Alembic description)...
        first = run_custos("server", "run", "--config", str(rig.config_path))
        # ...and at warning the WHOLE of stderr is the one error line.
        quiet = run_custos(
            "server", "run", "--config", str(rig.config_path), "--log-level", "warning"
        )
    error = "error [server_start]: agent_api.address: cannot listen on"
    assert first.returncode == 1, first.stderr
    *records, last = first.stderr.strip().splitlines()
    assert last.startswith(error)
    record = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ custos\.")
    assert records and all(record.match(line) for line in records), first.stderr
    assert quiet.returncode == 1, quiet.stderr
    assert len(quiet.stderr.strip().splitlines()) == 1, quiet.stderr
    assert quiet.stderr.startswith(error)


def test_run_serves_until_sigterm_and_healthcheck_says_so(server_rig_factory: RigFactory) -> None:
    rig = server_rig_factory(with_http=True)
    with ServerProcess(rig) as proc:
        log = proc.log_path.read_text()
        assert f"custos server ready: agent_api={rig.agent_api_address}" in log
        assert f"http=127.0.0.1:{rig.http_port}" in log
        ok = run_custos("server", "healthcheck", "--admin-socket", str(rig.admin_socket))
        assert (ok.returncode, ok.stdout.strip()) == (0, "server is healthy"), ok.stderr
        by_config = run_custos("server", "healthcheck", "--config", str(rig.config_path))
        assert by_config.returncode == 0, by_config.stderr
        as_json = run_custos(
            "server", "healthcheck", "--config", str(rig.config_path), "--output", "json"
        )
        assert as_json.returncode == 0, as_json.stderr
        assert json.loads(as_json.stdout) == {
            "healthy": True,
            "admin_socket": str(rig.admin_socket),
        }
        assert proc.terminate() == 0
    assert not rig.admin_socket.exists()
    down = run_custos(
        "server", "healthcheck", extra_env={"CUSTOS_ADMIN_SOCKET": f"unix://{rig.admin_socket}"}
    )
    assert down.returncode == 1
    assert "unhealthy" in down.stderr
    down_json = run_custos(
        "server", "healthcheck", "-o", "json", "--admin-socket", str(rig.admin_socket)
    )
    assert down_json.returncode == 1
    assert json.loads(down_json.stdout) == {
        "healthy": False,
        "admin_socket": str(rig.admin_socket),
    }


def test_healthcheck_of_a_path_that_is_not_a_socket_fails_cleanly(tmp_path: Path) -> None:
    plain = tmp_path / "file"
    plain.write_text("x")
    result = run_custos("server", "healthcheck", "--admin-socket", str(plain))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr


def test_the_rig_reports_a_server_that_exits(server_rig_factory: RigFactory) -> None:
    rig = server_rig_factory()
    rig.config_path.write_text(rig.config_path.read_text() + "\n[bogus]\nx = 1\n")
    with pytest.raises(ServerRigError, match="bogus: unknown key"):
        ServerProcess(rig).start()


def test_two_server_processes_on_one_postgresql_both_serve(
    server_rig_factory: RigFactory, postgres_db: str, softhsm: SoftHSMToken
) -> None:
    # As in production: one datastore and one key store (an HSM token) for both.
    key_store = {"store": "pkcs11", "pkcs11_uri": softhsm.uri, "pkcs11_module": softhsm.module}
    rigs = [server_rig_factory(datastore_url=postgres_db, key_store=key_store) for _ in range(2)]
    procs = [ServerProcess(rig, env=softhsm.env) for rig in rigs]
    try:
        for proc in procs:  # both start at once: migrations and first keys race
            proc.start(wait=False)
        for proc in procs:
            proc.wait_ready()
        for rig in rigs:
            ok = run_custos("server", "healthcheck", "--admin-socket", str(rig.admin_socket))
            assert ok.returncode == 0, ok.stderr
        asyncio.run(_agent_of_one_served_by_the_other(rigs))
    finally:
        for proc in procs:
            if proc.process is not None and proc.process.poll() is None:
                proc.terminate()


async def _agent_of_one_served_by_the_other(rigs: list[ServerRig]) -> None:
    first, second = rigs
    async with AdminClient(first.admin_socket) as admin:
        secret = (await admin.generate_token(ttl=600)).token
        bundle = bundle_from_proto(await admin.get_bundle())
    async with AdminClient(second.admin_socket) as admin:
        assert bundle_from_proto(await admin.get_bundle()) == bundle  # one set of keys
    agent = await join_token_agent(first.agent_api_address, bundle, secret)
    try:
        with Datastore.open(first.url, trust_domain="example.org") as ds:
            entry = ds.entries.create("spiffe://example.org/w", agent.identity.spiffe_id, ["a:b"])
        for rig in rigs:
            client = agent.reconnect(rig.agent_api_address)
            try:
                issued = await client.new_x509_svids([X509Params(entry.id, new_csr(), "memory")])
                assert issued[0].error is None
            finally:
                client.channel.close()
    finally:
        await agent.close()


def test_run_logs_one_json_object_per_line_on_request(server_rig_factory: RigFactory) -> None:
    rig = server_rig_factory()
    with ServerProcess(rig, args=("--log-format", "json", "--log-level", "debug")) as proc:
        assert proc.terminate() == 0
    records = []
    for line in proc.log_path.read_text().splitlines():
        if line.startswith("custos server ready"):  # stdout, for scripts
            continue
        records.append(json.loads(line))
    assert {"time", "level", "logger", "msg"} <= set(records[0])
    assert any(r["logger"] == "custos.server.app" and "ready" in r["msg"] for r in records)
    assert any(r["msg"] == "stopping (signal received)" for r in records)


def test_run_rejects_an_unknown_log_format(server_rig_factory: RigFactory) -> None:
    rig = server_rig_factory()
    result = run_custos("server", "run", "--config", str(rig.config_path), "--log-format", "xml")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_run_with_the_database_unreachable_is_one_line(server_rig_factory: RigFactory) -> None:
    closed = free_port()  # nothing listens there
    rig = server_rig_factory(datastore_url=f"postgresql+psycopg://custos@127.0.0.1:{closed}/x")
    result = run_custos("server", "run", "--config", str(rig.config_path))
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error [server_start]: ")
    assert "[datastore_unavailable]" in last
    assert "Traceback" not in result.stderr


def test_a_federation_certificate_that_is_a_fifo_is_one_line_not_a_hang(
    server_rig_factory: RigFactory, tmp_path: Path
) -> None:
    fifo = tmp_path / "cert.pem"
    os.mkfifo(fifo)
    rig = server_rig_factory(
        sections={
            "federation": {
                "address": f"127.0.0.1:{free_port()}",
                "cert_file": str(fifo),
                "key_file": str(fifo),
            }
        }
    )
    result = run_custos("server", "run", "--config", str(rig.config_path))
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error [server_start]: federation.cert_file: "), last
