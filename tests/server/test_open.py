"""Opening: URL schemes, migrations at open, restart, and the database gone."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text

import custos.server.datastore as datastore_package
from custos.server.datastore import (
    Datastore,
    DatastoreError,
    DatastoreUnavailableError,
    EntryExistsError,
    UnsupportedDatastoreURLError,
)
from custos.testing.postgres import PostgresServer, start_postgres
from custos.wimse.replay import ReplayCacheUnavailableError

from .conftest import AGENT, TRUST_DOMAIN


@pytest.mark.parametrize(
    "url",
    [
        "mysql://u@h/db",
        "redis://localhost",
        "sqlite://",
        "sqlite:///:memory:",
        "not a url",
        "",
        42,
    ],
)
def test_unsupported_url(url: object) -> None:
    with pytest.raises(UnsupportedDatastoreURLError) as err:
        Datastore.open(url, trust_domain=TRUST_DOMAIN)  # type: ignore[arg-type]
    assert err.value.code == "unsupported_datastore_url"


def test_plain_postgresql_scheme_uses_psycopg(postgres_db: str) -> None:
    plain = postgres_db.replace("postgresql+psycopg://", "postgresql://")
    with Datastore.open(plain, trust_domain=TRUST_DOMAIN) as ds:
        assert ds.backend == "postgresql"
        assert ds.entries.count() == 0


def test_restart_keeps_everything(store_url: str) -> None:
    with Datastore.open(store_url, trust_domain=TRUST_DOMAIN) as ds:
        entry = ds.entries.create("spiffe://example.org/w", AGENT, ["unix:uid:1"])
        _, secret = ds.join_tokens.create(600)
        agent = ds.agents.attested(AGENT, attestor="t", selectors=[], serial="1", expires_at=9.0)
        ds.replay.check_and_store("ns", "v", 9e9)
        seq = ds.entries.last_change_seq()
    with Datastore.open(store_url, trust_domain=TRUST_DOMAIN) as ds:  # migrations: a no-op
        assert ds.entries.get(entry.id) == entry
        assert ds.entries.last_change_seq() == seq
        assert ds.agents.get(AGENT) == agent
        assert not ds.replay.check_and_store("ns", "v", 9e9)
        ds.join_tokens.consume(secret)


def test_sqlite_in_missing_directory_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(DatastoreUnavailableError):
        Datastore.open(f"sqlite:///{tmp_path}/no/such/dir/x.db", trust_domain=TRUST_DOMAIN)


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    # Its own server: this test stops it, which must not hit the shared one.
    server = start_postgres()
    try:
        yield server
    finally:
        server.destroy()


def test_database_gone_and_back(own_postgres: PostgresServer) -> None:
    url = own_postgres.create_database("gone")
    with Datastore.open(url, trust_domain=TRUST_DOMAIN) as ds:
        entry = ds.entries.create("spiffe://example.org/w", AGENT, ["unix:uid:1"])
        own_postgres.stop()
        with pytest.raises(DatastoreUnavailableError) as err:
            ds.entries.get(entry.id)
        assert err.value.code == "datastore_unavailable"
        with pytest.raises(DatastoreUnavailableError):
            ds.join_tokens.create(60)
        with pytest.raises(ReplayCacheUnavailableError):
            ds.replay.check_and_store("ns", "v", 9e9)
        with pytest.raises(DatastoreUnavailableError):
            Datastore.open(url, trust_domain=TRUST_DOMAIN)
        own_postgres.start()
        assert ds.entries.get(entry.id) == entry
        assert ds.entries.count() == 1


@pytest.mark.parametrize("missing", ["sqlalchemy", "alembic"])
def test_without_the_server_extra_a_clear_error(missing: str) -> None:
    # A None in sys.modules makes the import fail as on a machine without the library.
    code = (
        f"import sys; sys.modules[{missing!r}] = None\n"
        "from custos.errors import CustosError\n"
        "try:\n"
        "    import custos.server.datastore\n"
        "except CustosError as e:\n"
        "    print(e.code, e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("missing_extra"), done.stdout
    assert "pip install 'custos[server]'" in done.stdout


def test_postgresql_without_psycopg_a_clear_error() -> None:
    code = (
        "import sys; sys.modules['psycopg'] = None\n"
        "from custos.errors import CustosError\n"
        "from custos.server.datastore import Datastore\n"
        "try:\n"
        "    Datastore.open('postgresql://u@127.0.0.1:1/db', trust_domain='example.org')\n"
        "except CustosError as e:\n"
        "    print(e.code, e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("missing_extra"), done.stdout


def test_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(DatastoreUnavailableError) as err:
        Datastore.open(f"sqlite:///{path}", trust_domain=TRUST_DOMAIN)
    assert "not a database" in err.value.message


def test_a_schema_newer_than_this_custos_is_refused(store_url: str) -> None:
    Datastore.open(store_url, trust_domain=TRUST_DOMAIN).close()
    engine = create_engine(store_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
    engine.dispose()
    with pytest.raises(DatastoreError) as err:
        Datastore.open(store_url, trust_domain=TRUST_DOMAIN)
    assert err.value.code == "datastore_schema_unknown"
    assert "9999_future" in err.value.message


def _open_in_child(url: str, start: float) -> int:
    time.sleep(max(0.0, start - time.time()))  # line the children up
    with Datastore.open(url, trust_domain=TRUST_DOMAIN) as ds:
        return ds.entries.count()


def test_servers_opening_one_fresh_database_at_once(store_url: str) -> None:
    # Each runs the migrations; exactly one must create the tables, the others wait.
    start = time.time() + 2.0
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        assert pool.starmap(_open_in_child, [(store_url, start)] * 3) == [0, 0, 0]


def test_migration_0004_keeps_entries_that_were_already_identical(
    store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A database of an older custos (schema 0003) already holding two identical entries.
    with Datastore.open(store_url, trust_domain=TRUST_DOMAIN) as ds:
        first = ds.entries.create("spiffe://example.org/w", AGENT, ["unix:uid:1"])
    engine = create_engine(store_url)
    config = Config()
    migrations = Path(datastore_package.__file__).parent / "migrations"
    config.set_main_option("script_location", str(migrations))
    twin = "f" * 32  # sorts after the first entry's id: the first keeps the hash
    others = (
        "spiffe_id, parent_id, x509_svid_ttl, jwt_svid_ttl, wit_ttl, dns_names, "
        "key_custody, hint, admin, downstream, expires_at, revision, change_seq"
    )
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0003")
        copy = f"INSERT INTO entries (id, {others}) SELECT :t, {others} FROM entries"
        conn.execute(text(copy), {"t": twin})
        conn.execute(text("INSERT INTO entry_selectors VALUES (:t, 'unix', 'uid:1')"), {"t": twin})
    engine.dispose()

    with caplog.at_level("WARNING"), Datastore.open(store_url, trust_domain=TRUST_DOMAIN) as ds:
        assert {e.id for e in ds.entries.list()} == {first.id, twin}  # nothing deleted
        with pytest.raises(EntryExistsError) as err:
            ds.entries.create("spiffe://example.org/w", AGENT, ["unix:uid:1"])
        assert first.id in err.value.message
        ds.entries.delete(twin)
    assert f"entry {twin} is identical to entry {first.id}" in caplog.text
