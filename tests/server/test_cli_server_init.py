"""``custos server init`` and ``custos server check-config``, run as an operator would."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cli_runner import run_custos
from custos.server.config import load_server_config


def test_init_writes_a_config_that_loads(tmp_path: Path) -> None:
    data_dir = tmp_path / "srv"
    result = run_custos(
        "server", "init", "--trust-domain", "example.org", "--data-dir", str(data_dir)
    )
    assert result.returncode == 0, result.stderr
    path = data_dir / "server.toml"
    assert result.stdout.strip() == str(path)
    assert stat.S_IMODE(os.stat(data_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

    config = load_server_config(path)
    assert config.trust_domain.name == "example.org"
    assert config.datastore.url == f"sqlite:///{data_dir}/datastore.sqlite3"
    assert config.agent_api.address == "127.0.0.1:8081"
    assert config.admin.socket == data_dir / "admin.sock"
    for key in (config.ca, config.jwt_svid, config.wit):
        assert key.key_store.store == "exportable"
        assert key.key_store.key_dir == data_dir / "keys"
    assert len({config.ca.key_name, config.jwt_svid.key_name, config.wit.key_name}) == 3

    checked = run_custos("server", "check-config", "--config", str(path))
    assert (checked.returncode, checked.stdout.strip()) == (0, "ok"), checked.stderr


def test_init_twice_refuses_and_keeps_the_first_file(tmp_path: Path) -> None:
    args = ("server", "init", "--data-dir", str(tmp_path))
    assert run_custos(*args, "--trust-domain", "first.example").returncode == 0
    before = (tmp_path / "server.toml").read_bytes()
    again = run_custos(*args, "--trust-domain", "second.example")
    assert again.returncode == 1
    assert again.stderr.startswith("error [server_config]: ")
    assert "already exists" in again.stderr
    assert "Traceback" not in again.stderr
    assert (tmp_path / "server.toml").read_bytes() == before


def test_init_relative_data_dir_writes_absolute_paths(tmp_path: Path) -> None:
    result = run_custos(
        "server", "init", "--trust-domain", "example.org", "--data-dir", "rel", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    config = load_server_config(tmp_path / "rel" / "server.toml")
    assert config.admin.socket == tmp_path / "rel" / "admin.sock"


def test_init_bad_trust_domain_writes_nothing(tmp_path: Path) -> None:
    result = run_custos(
        "server", "init", "--trust-domain", "Not A Domain", "--data-dir", str(tmp_path / "srv")
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error [")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "srv").exists()


def test_init_data_dir_too_long_for_the_socket_writes_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / ("d" * 120)
    result = run_custos(
        "server", "init", "--trust-domain", "example.org", "--data-dir", str(data_dir)
    )
    assert result.returncode == 1
    assert "admin.socket" in result.stderr
    assert not data_dir.exists()


def test_init_data_dir_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    result = run_custos(
        "server", "init", "--trust-domain", "example.org", "--data-dir", str(tmp_path / "file")
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error [server_config]: cannot create data directory")


def test_check_config_reports_one_line(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text('trust_domain = "example.org"\nbogus = 1\n', encoding="utf-8")
    result = run_custos("server", "check-config", "--config", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error [server_config]: {path}: ")


def test_check_config_fifo_and_missing(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    for path, says in ((fifo, "not a regular file"), (tmp_path / "no.toml", "does not exist")):
        result = run_custos("server", "check-config", "--config", str(path))
        assert result.returncode == 1
        assert says in result.stderr
        assert "Traceback" not in result.stderr


def test_check_config_from_environment(tmp_path: Path) -> None:
    assert (
        run_custos(
            "server", "init", "--trust-domain", "example.org", "--data-dir", str(tmp_path)
        ).returncode
        == 0
    )
    result = run_custos(
        "server", "check-config", extra_env={"CUSTOS_SERVER_CONFIG": str(tmp_path / "server.toml")}
    )
    assert (result.returncode, result.stdout.strip()) == (0, "ok"), result.stderr


def test_check_config_without_config_is_a_usage_error() -> None:
    result = run_custos("server", "check-config")
    assert result.returncode == 2
