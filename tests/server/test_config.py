"""server.toml: every mistake is one ServerConfigError line naming the key."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest

from custos.errors import CustosError
from custos.server.config import (
    ServerConfig,
    ServerConfigError,
    load_server_config,
    parse_duration,
    server_config_from_toml,
)

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


def _error(text: str) -> ServerConfigError:
    with pytest.raises(ServerConfigError) as info:
        server_config_from_toml(text, source="server.toml")
    err = info.value
    assert isinstance(err, CustosError)
    assert err.code == "server_config"
    assert "\n" not in err.message
    return err


def test_minimal_config_has_the_documented_defaults() -> None:
    config = server_config_from_toml(MINIMAL)
    assert config.trust_domain.name == "example.org"
    assert config.x509_svid.default_ttl == timedelta(hours=1)
    assert config.jwt_svid.default_ttl == timedelta(minutes=5)
    assert config.wit.default_ttl == timedelta(hours=1)
    assert config.ca.ttl == timedelta(hours=24)
    assert config.ca.self_signed
    assert config.datastore.url.startswith("sqlite:////")
    assert (config.agent_api.host, config.agent_api.port) == ("127.0.0.1", 8081)
    assert config.admin.uids == frozenset({0})
    with pytest.raises(ValueError):  # frozen
        config.trust_domain = config.trust_domain  # type: ignore[misc]


def test_full_config() -> None:
    text = (
        'trust_domain = "spiffe://prod.example"\n'
        '[datastore]\nurl = "postgresql+psycopg://custos:secret@db.example:5432/custos"\n'
        '[agent_api]\naddress = "[::1]:9443"\n'
        '[admin]\nsocket = "/run/custos/admin.sock"\nallowed_uids = [1000, 1001]\n'
        '[x509_svid]\ndefault_ttl = 1800\n'
        + KEYS.replace('key_name = "ca"\n', 'key_name = "ca"\nttl = "1h30m"\n'
                       'upstream_cert = "/etc/custos/root.pem"\n'
                       'upstream_key = "/etc/custos/root.key"\n')
    )  # fmt: skip
    config = server_config_from_toml(text)
    assert config.trust_domain.name == "prod.example"
    assert (config.agent_api.host, config.agent_api.port) == ("::1", 9443)
    assert config.admin.uids == frozenset({0, 1000, 1001})
    assert config.x509_svid.default_ttl == timedelta(minutes=30)
    assert config.ca.ttl == timedelta(minutes=90)
    assert not config.ca.self_signed
    assert config.ca.upstream_key == Path("/etc/custos/root.key")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [('"1h"', 3600), ('"5m"', 300), ('"30s"', 30), ('"1h30m"', 5400), ("90", 90), ("2.5", 2.5)],
)
def test_durations(value: str, seconds: float) -> None:
    config = server_config_from_toml(MINIMAL + f"[x509_svid]\ndefault_ttl = {value}\n")
    assert config.x509_svid.default_ttl == timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("extra", "where", "says"),
    [
        ("[x509_svid]\ndefault_ttl = nan\n", "x509_svid.default_ttl:", "finite"),
        ("[x509_svid]\ndefault_ttl = inf\n", "x509_svid.default_ttl:", "finite"),
        ("[x509_svid]\ndefault_ttl = -inf\n", "x509_svid.default_ttl:", "finite"),
        ("[x509_svid]\ndefault_ttl = 0\n", "x509_svid.default_ttl:", "at least 1"),
        ('[x509_svid]\ndefault_ttl = "0s"\n', "x509_svid.default_ttl:", "at least 1"),
        ("[x509_svid]\ndefault_ttl = -5\n", "x509_svid.default_ttl:", "at least 1"),
        ("[x509_svid]\ndefault_ttl = true\n", "x509_svid.default_ttl:", "not bool"),
        ('[x509_svid]\ndefault_ttl = "1 hour"\n', "x509_svid.default_ttl:", "duration"),
        ('[x509_svid]\ndefault_ttl = "1d"\n', "x509_svid.default_ttl:", "duration"),
        ('[x509_svid]\ndefault_ttl = "100000h"\n', "x509_svid.default_ttl:", "at most"),
        ('[x509_svid]\ndefault_ttl = "48h"\n', "", "shorter than ca.ttl"),
        ("[x509_svid]\ndefault_ttl = [1]\n", "x509_svid.default_ttl:", "number"),
        ("[agent_api]\naddress = 8081\n", "agent_api.address:", "string"),
        ('[agent_api]\naddress = "127.0.0.1"\n', "agent_api.address:", "host:port"),
        ('[agent_api]\naddress = "127.0.0.1:0"\n', "agent_api.address:", "1 to 65535"),
        ('[agent_api]\naddress = "127.0.0.1:70000"\n', "agent_api.address:", "1 to 65535"),
        ('[agent_api]\naddress = "127.0.0.1:\uff18\uff10"\n', "agent_api.address:", "1 to 65535"),
        ('[agent_api]\naddress = "::1:8081"\n', "agent_api.address:", "host must be"),
        ('[agent_api]\naddress = "[fe::zz]:8081"\n', "agent_api.address:", "IPv6"),
        ('[agent_api]\naddress = "bad_host!:8081"\n', "agent_api.address:", "host must be"),
        ('[datastore]\nurl = "mysql://db/custos"\n', "datastore.url:", "only sqlite"),
        ('[datastore]\nurl = "/var/lib/db"\n', "datastore.url:", "URL"),
        ('[datastore]\nurl = "sqlite://"\n', "datastore.url:", "database file"),
        ('[datastore]\nurl = "sqlite:///:memory:"\n', "datastore.url:", "database file"),
        ('[datastore]\nurl = "sqlite:///rel.db"\n', "datastore.url:", "absolute"),
        ('[datastore]\nurl = "postgresql://h:99999/x"\n', "datastore.url:", "malformed"),
        ('[admin]\nsocket = "admin.sock"\n', "admin.socket:", "absolute"),
        (f'[admin]\nsocket = "/{"a" * 120}"\n', "admin.socket:", "107 bytes"),
        ('[admin]\nsocket = "/a\\u0000b"\n', "admin.socket:", "NUL"),
        ("[admin]\nallowed_uids = [-1]\n", "admin.allowed_uids[0]:", "greater than"),
        ("[admin]\nallowed_uids = [4294967295]\n", "admin.allowed_uids[0]:", "less than"),
        ('[admin]\nallowed_uids = [1000, "1001"]\n', "admin.allowed_uids[1]:", "integer"),
        ("[admin]\nallowed_uids = [1.0]\n", "admin.allowed_uids[0]:", "integer"),
        ("[admin]\nallowed_uids = 1000\n", "admin.allowed_uids:", "tuple"),
        ("[admin]\nuids = [1000]\n", "admin.uids:", "unknown key"),
        ("[agent_api]\nport = 8081\n", "agent_api.port:", "unknown key"),
        ("log_level = 'debug'\n", "log_level:", "unknown key"),
        ("x509_svid = 3\n", "x509_svid:", "valid dictionary"),
    ],
)
def test_bad_values_are_one_line_naming_the_key(extra: str, where: str, says: str) -> None:
    # A table goes after the others; a top-level key before the first table.
    text = MINIMAL + extra if extra.startswith("[") else extra + MINIMAL
    message = _error(text).message
    assert message.startswith(f"server.toml: {where}"), message
    assert says in message, message


@pytest.mark.parametrize(
    ("old", "new", "where", "says"),
    [
        ('"example.org"', '"Example.org"', "trust_domain:", "lowercase"),
        ('"example.org"', '"spiffe://example.org/path"', "trust_domain:", "trust domain"),
        ('"example.org"', '""', "trust_domain:", "trust domain"),
        ('"example.org"', "3", "trust_domain:", "string"),
        ('key_name = "ca"', 'key_name = "../ca"', "ca.key_name:", "key names"),
        ('key_name = "jwt"', "key_name = 1", "jwt_svid.key_name:", "string"),
        ('store = "exportable"', 'store = "memory"', "ca.key_store:", "memory store"),
        ('store = "exportable"', 'store = "disk"', "ca.key_store.store:", "'tpm'"),
        ('key_name = "wit"\n', "", "wit.key_name:", "required key is missing"),
        ('trust_domain = "example.org"\n', "", "trust_domain:", "required key is missing"),
        ('key_name = "ca"', 'key_name = "ca"\nupstream_cert = "/r.pem"', "ca:", "go together"),
        ('key_name = "ca"', 'key_name = "ca"\nupstream_key = "r.key"', "ca.upstream_key:",
         "absolute"),
        ('key_name = "ca"', 'key_name = "ca"\nttl = "0s"', "ca.ttl:", "at least 1"),
        ('key_name = "jwt"', 'key_name = "jwt"\ndefault_ttl = "0m"', "jwt_svid.default_ttl:",
         "at least 1"),
        ('key_name = "wit"', 'key_name = "wit"\ndefault_ttl = nan', "wit.default_ttl:", "finite"),
        ('key_dir = "/var/lib/custos/keys"\n[jwt', 'tcti = "file:/x"\n[jwt',
         "ca.key_store.tcti:", "TCTI"),
    ],
)  # fmt: skip
def test_bad_sections_are_one_line_naming_the_key(
    old: str, new: str, where: str, says: str
) -> None:
    assert old in MINIMAL
    message = _error(MINIMAL.replace(old, new, 1)).message
    assert message.startswith(f"server.toml: {where}"), message
    assert says in message, message


def test_several_mistakes_are_still_one_line() -> None:
    message = _error("bogus = 1\n" + MINIMAL.replace('"example.org"', '"A"')).message
    assert "(and 1 more)" in message


def test_secrets_in_inputs_are_never_quoted() -> None:
    text = MINIMAL.replace(
        'store = "exportable"',
        'store = "pkcs11"\npkcs11_uri = "pkcs11:token=t?pin-value=hunter2"\ntpm_loaded_keys = 99',
        1,
    )
    assert "hunter2" not in _error(text).message
    text = '[datastore]\nurl = "postgresql://u:hunter2@h:99999/x"\n' + MINIMAL
    assert "hunter2" not in _error(text).message


def test_toml_syntax_error_is_one_line() -> None:
    message = _error(MINIMAL + "[wit\n").message
    assert message.startswith("server.toml: TOML syntax error:")
    assert "line" in message


def test_parse_duration_refuses_bool_and_timedelta_passes() -> None:
    assert parse_duration(timedelta(minutes=2), name="t", maximum=600) == timedelta(minutes=2)
    with pytest.raises(CustosError):
        parse_duration(False, name="t", maximum=600)


def test_dump_round_trips() -> None:
    config = server_config_from_toml(MINIMAL)
    assert ServerConfig.model_validate(config.model_dump(mode="json")) == config


# ---- the file itself -------------------------------------------------------


def test_load_from_file(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text(MINIMAL, encoding="utf-8")
    assert load_server_config(path).trust_domain.name == "example.org"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ServerConfigError, match="does not exist"):
        load_server_config(tmp_path / "nope.toml")


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    os.mkfifo(path)
    with pytest.raises(ServerConfigError, match="not a regular file"):
        load_server_config(path)


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ServerConfigError, match="not a regular file"):
        load_server_config(tmp_path)


def test_non_utf8_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_bytes(MINIMAL.encode() + b"# \xff\xfe caf\xe9\n")
    with pytest.raises(ServerConfigError, match="not UTF-8"):
        load_server_config(path)


def test_huge_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text(MINIMAL + "#" * (300 * 1024) + "\n", encoding="utf-8")
    with pytest.raises(ServerConfigError, match="larger than"):
        load_server_config(path)


def test_the_documented_example_loads() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text(encoding="utf-8")
    section = doc.split("## Server", 1)[1]
    example = section.split("```toml\n", 1)[1].split("```", 1)[0]
    config = server_config_from_toml(example)
    assert config.admin.uids == frozenset({0, 1000})


@pytest.mark.parametrize(
    ("address", "host", "port"),
    [
        ("localhost:8081", "localhost", 8081),
        ("spire.example.org:443", "spire.example.org", 443),
        ("0.0.0.0:65535", "0.0.0.0", 65535),
        ("[2001:db8::1]:1", "2001:db8::1", 1),
    ],
)
def test_good_addresses(address: str, host: str, port: int) -> None:
    config = server_config_from_toml(MINIMAL + f'[agent_api]\naddress = "{address}"\n')
    assert (config.agent_api.host, config.agent_api.port) == (host, port)


def test_a_bool_is_not_a_uid() -> None:
    message = _error(MINIMAL + "[admin]\nallowed_uids = [true]\n").message
    assert message.startswith("server.toml: admin.allowed_uids[0]: ")


def test_a_datastore_password_never_shows_in_repr() -> None:
    # configs get logged; a PostgreSQL URL may carry a password
    text = MINIMAL + '[datastore]\nurl = "postgresql://custos:hunter2@db.example/custos"\n'
    config = server_config_from_toml(text)
    assert "hunter2" in config.datastore.url
    assert "hunter2" not in repr(config) and "hunter2" not in str(config)
    assert "hunter2" not in repr(config.datastore)


def test_agent_api_dns_name_is_lower_case_and_never_a_wildcard() -> None:
    # Entry DNS names are stored in lower case: the server's own name is compared
    # with them in the same form (admin entry write, issuer).
    config = server_config_from_toml(MINIMAL + '[agent_api]\ndns_name = "Custos-Server."\n')
    assert config.agent_api.dns_name == "custos-server"
    err = _error(MINIMAL + '[agent_api]\ndns_name = "*.Example.org"\n')
    assert err.message.startswith("server.toml: agent_api.dns_name:"), err.message
    assert "wildcard" in err.message
