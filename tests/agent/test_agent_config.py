"""agent.toml: every mistake is one AgentConfigError line naming the dotted key, and
the join token never shows in a repr or a message."""

# ruff: noqa: E501 -- one line per mistake in the table below reads best

from __future__ import annotations

import logging
import re
from dataclasses import fields
from pathlib import Path

import pytest

from custos.agent.config import (
    JOIN_TOKEN_ENV,
    AgentConfig,
    AgentConfigError,
    agent_config_from_toml,
    load_agent_config,
)
from custos.errors import CustosError
from custos.keys.config import KeyStoreConfig
from custos.plugin import PluginConfig

TOKEN = "tok-0123456789-secret"
SERVER = """
[server]
address = "custos.example.org:8081"
bundle_file = "/etc/custos/bundle.pem"
"""
NODE = f"""
[node_attestor.join_token]
token = "{TOKEN}"
"""
MINIMAL = 'trust_domain = "example.org"\n' + SERVER + NODE


@pytest.fixture(autouse=True)
def _no_env_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(JOIN_TOKEN_ENV, raising=False)


def _error(text: str) -> str:
    with pytest.raises(AgentConfigError) as info:
        agent_config_from_toml(text, source="agent.toml")
    err = info.value
    assert isinstance(err, CustosError)
    assert err.code == "agent_config"
    assert "\n" not in err.message
    assert TOKEN not in err.message
    return err.message


def test_minimal_config_has_the_documented_defaults() -> None:
    config = agent_config_from_toml(MINIMAL)
    assert str(config.trust_domain) == "example.org"
    assert config.server.address == "custos.example.org:8081"
    assert config.server.server_name == "custos-server"
    assert config.server.bundle_file == Path("/etc/custos/bundle.pem")
    assert config.server.insecure_bootstrap is False
    assert config.socket == Path("/run/custos/agent.sock")
    assert config.data_dir == Path("/var/lib/custos/agent")
    assert config.custody.tiers == ("memory",)
    assert config.agent_key_custody == "memory"
    assert config.rotation.jitter == 0.1
    assert config.workload_attestor_plugins() == [PluginConfig("unix", {})]
    node = config.node_attestor_plugin()
    assert node.name == "join_token"
    assert node.config == {"token": TOKEN}


def test_the_token_is_in_no_repr() -> None:
    config = agent_config_from_toml(MINIMAL)
    for shown in (repr(config), str(config), repr(config.node_attestor),
                  repr(config.node_attestor_plugin())):  # fmt: skip
        assert TOKEN not in shown


def test_a_full_config() -> None:
    text = f"""
trust_domain = "example.org"
socket = "/tmp/custos/agent.sock"
data_dir = "/srv/custos"
[server]
address = "[::1]:8081"
server_name = "Custos.Example.org"
insecure_bootstrap = true
[node_attestor.join_token]
token = "{TOKEN}"
[workload_attestors.unix]
discover_workload_path = true
[workload_attestors.example]
report_uid = true
[custody.tpm]
tcti = "swtpm:host=127.0.0.1,port=2321"
[custody.pkcs11]
pkcs11_uri = "pkcs11:token=custos;pin-value=1234"
pkcs11_module = "/usr/lib/softhsm/libsofthsm2.so"
[custody.exportable]
key_dir = "/srv/custos/exportable"
[agent_key]
custody = "pkcs11"
[workload_api]
requests_per_second = 50
burst = 100
max_streams_per_uid = 8
max_message_bytes = 65536
attestation_cache_seconds = 0
[rotation]
jitter = 0
"""
    config = agent_config_from_toml(text)
    assert config.server.server_name == "custos.example.org"
    assert config.custody.tiers == ("tpm", "pkcs11", "exportable")
    assert config.agent_key_custody == "pkcs11"
    stores = config.key_stores()
    assert stores["tpm"].key_dir == Path("/srv/custos/keys/tpm")  # default under data_dir
    assert stores["exportable"].key_dir == Path("/srv/custos/exportable")  # as given
    assert stores["pkcs11"].store == "pkcs11"
    assert "1234" not in repr(config)
    assert [p.name for p in config.workload_attestor_plugins()] == ["unix", "example"]
    assert config.workload_api.requests_per_second == 50.0
    assert config.rotation.jitter == 0.0
    # No memory table here: the memory store is still there for an agent key that asks.
    assert config.key_store("memory") == KeyStoreConfig(store="memory")
    with pytest.raises(AgentConfigError, match=r"custody\.tpm: this node has no tpm tier"):
        agent_config_from_toml(MINIMAL).key_store("tpm")


@pytest.mark.parametrize(
    ("custody", "expected"),
    [
        ("[custody.tpm]\n[custody.pkcs11]\npkcs11_uri = 'pkcs11:token=t'\n[custody.memory]\n", "tpm"),
        ("[custody.pkcs11]\npkcs11_uri = 'pkcs11:token=t'\n[custody.memory]\n", "pkcs11"),
        ("[custody.exportable]\n", "memory"),
    ],
)
def test_the_agent_key_tier_defaults_to_tpm_then_pkcs11_then_memory(
    custody: str, expected: str
) -> None:
    assert agent_config_from_toml(MINIMAL + custody).agent_key_custody == expected


def test_the_insecure_bootstrap_is_logged_loudly(caplog: pytest.LogCaptureFixture) -> None:
    text = MINIMAL.replace('bundle_file = "/etc/custos/bundle.pem"', "insecure_bootstrap = true")
    with caplog.at_level(logging.WARNING, logger="custos.agent.config"):
        agent_config_from_toml(text)
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "INSECURE BOOTSTRAP" in record.getMessage()
    assert "custos.example.org:8081" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="custos.agent.config"):
        agent_config_from_toml(MINIMAL)
    assert not caplog.records


def test_the_token_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "join-token"
    path.write_text(TOKEN + "\n")
    text = MINIMAL.replace(f'token = "{TOKEN}"', f'token_file = "{path}"')
    config = agent_config_from_toml(text)
    assert config.node_attestor_plugin().config == {"token": TOKEN}


def test_the_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(JOIN_TOKEN_ENV, TOKEN)
    text = MINIMAL.replace(f'token = "{TOKEN}"\n', "")
    assert agent_config_from_toml(text).node_attestor_plugin().config == {"token": TOKEN}
    # The file's own token wins over the environment.
    monkeypatch.setenv(JOIN_TOKEN_ENV, "other")
    assert agent_config_from_toml(MINIMAL).node_attestor_plugin().config == {"token": TOKEN}


def test_another_node_attestor_keeps_its_settings() -> None:
    text = MINIMAL.replace(NODE, '[node_attestor.tpm]\nek_hash = "x"\n')
    assert agent_config_from_toml(text).node_attestor_plugin().name == "tpm"
    assert agent_config_from_toml(text).node_attestor_plugin().config == {"ek_hash": "x"}


def test_the_workload_api_defaults_are_the_workload_apis() -> None:
    from custos.agent.workload_api import limits
    defaults = limits.WorkloadApiLimits()
    config = agent_config_from_toml(MINIMAL).workload_api
    assert {f.name: getattr(defaults, f.name) for f in fields(defaults)} == config.model_dump()


NO_TOKEN = MINIMAL.replace(f'token = "{TOKEN}"\n', "")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "trust_domain: required key is missing (and 2 more)"),
        ("colour = 'blue'\n" + MINIMAL, "colour: unknown key"),
        (MINIMAL.replace("example.org", "Example.org/x"), "trust_domain:"),
        (MINIMAL.replace(SERVER, ""), "server: required key is missing"),
        (MINIMAL.replace("custos.example.org:8081", "custos.example.org"), "server.address:"),
        (MINIMAL.replace(":8081", ":0"), "server.address: the port must be a number"),
        (
            MINIMAL.replace('bundle_file = "/etc/custos/bundle.pem"', ""),
            "server: give exactly one of bundle_file",
        ),
        (
            MINIMAL.replace("[server]", "[server]\ninsecure_bootstrap = true"),
            "server: give exactly one of bundle_file",
        ),
        (MINIMAL.replace("[server]", "[server]\ninsecure_bootstrap = 1"), "server.insecure_bootstrap:"),
        (MINIMAL.replace("/etc/custos/bundle.pem", "bundle.pem"), "server.bundle_file: must be an absolute"),
        (MINIMAL.replace("[server]", "[server]\nserver_name = '*.x'"), "server.server_name: must be a DNS"),
        (MINIMAL.replace(NODE, ""), "node_attestor: required key is missing"),
        (MINIMAL + "[node_attestor.tpm]\n", "node_attestor: exactly one [node_attestor.<name>] table"),
        (MINIMAL.replace(NODE, "[node_attestor]\n"), "node_attestor: exactly one"),
        (MINIMAL.replace(NODE, "[node_attestor]\ntpm = 3\n"), "node_attestor.tpm:"),
        (MINIMAL.replace(NODE, "[node_attestor.TPM]\n"), "node_attestor: a plugin name is"),
        (NO_TOKEN, f"node_attestor.join_token: a join token is needed: token, token_file, or {JOIN_TOKEN_ENV}"),
        (MINIMAL.replace(f'"{TOKEN}"', '""'), "node_attestor.join_token.token: String should have at least 1"),
        (MINIMAL.replace(f'"{TOKEN}"', "3"), "node_attestor.join_token.token: Input should be a valid string"),
        (MINIMAL + "token_file = '/x'\n", "node_attestor.join_token: give token or token_file, not both"),
        (NO_TOKEN + "token_file = 'rel'\n", "node_attestor.join_token: token_file must be an absolute path"),
        (NO_TOKEN + "token_file = 3\n", "node_attestor.join_token: token_file must be an absolute path"),
        (NO_TOKEN + "token_file = '/nonexistent/t'\n", "node_attestor.join_token: token_file '/nonexistent/t' does not exist"),
        (NO_TOKEN + "token_file = '/dev/zero'\n", "node_attestor.join_token: token_file '/dev/zero' is not a regular file"),
        (MINIMAL + "tokn = 'x'\n", "node_attestor.join_token.tokn: unknown key"),
        (MINIMAL + "[workload_attestors]\n", "workload_attestors: at least one"),
        ("workload_attestors = 3\n" + MINIMAL, "workload_attestors: must be a table"),
        (MINIMAL + "[workload_attestors]\nunix = 3\n", "workload_attestors: workload_attestors.unix must be a table"),
        (MINIMAL + "[custody]\n", "custody: at least one [custody.<tier>] table"),
        (MINIMAL + "[custody.hsm]\n", "custody.hsm: unknown key"),
        (MINIMAL + "[custody.tpm]\nstore = 'memory'\n", "custody.tpm: store is the table's name (tpm)"),
        (MINIMAL + "[custody.tpm]\ntcti = 'bogus:'\n", "custody.tpm.tcti:"),
        (MINIMAL + "[custody.tpm]\ncolour = 1\n", "custody.tpm.colour: unknown key"),
        (MINIMAL + "[custody.pkcs11]\n", "custody.pkcs11: the pkcs11 tier needs pkcs11_uri"),
        (MINIMAL + "[agent_key]\ncustody = 'tpm'\n", "agent_key.custody names the tpm tier, but there is no [custody.tpm]"),
        (MINIMAL + "[agent_key]\ncustody = 'disk'\n", "agent_key.custody:"),
        (MINIMAL.replace("trust_domain", "socket = 'agent.sock'\ntrust_domain"), "socket: must be an absolute path"),
        (MINIMAL.replace("trust_domain", f"socket = '/{'s' * 107}'\ntrust_domain"), "socket: a Unix socket path is at most 107 bytes"),
        (MINIMAL.replace("trust_domain", "data_dir = 'var'\ntrust_domain"), "data_dir: must be an absolute path"),
        (MINIMAL + "[workload_api]\nrate = 3\n", "workload_api.rate: unknown key"),
        (MINIMAL + "[workload_api]\nburst = 0\n", "workload_api.burst:"),
        (MINIMAL + "[workload_api]\nburst = 1.5\n", "workload_api.burst:"),
        (MINIMAL + "[workload_api]\nrequests_per_second = true\n", "workload_api.requests_per_second: must be a number"),
        (MINIMAL + "[workload_api]\nrequests_per_second = inf\n", "workload_api.requests_per_second:"),
        (MINIMAL + "[workload_api]\nmax_message_bytes = 10\n", "workload_api.max_message_bytes:"),
        (MINIMAL + "[rotation]\njitter = 0.5\n", "rotation.jitter:"),
        (MINIMAL + "[rotation]\njitter = nan\n", "rotation.jitter:"),
        (MINIMAL + "[rotation]\njitter = -0.1\n", "rotation.jitter:"),
        ("trust_domain = \n", "agent.toml: TOML syntax error"),
    ],
)
def test_each_mistake_is_one_line_naming_the_key(text: str, expected: str) -> None:
    message = _error(text)
    assert message.startswith("agent.toml: ")
    assert expected in message


def test_load_agent_config_reads_a_bounded_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(MINIMAL)
    assert isinstance(load_agent_config(path), AgentConfig)
    with pytest.raises(AgentConfigError, match="does not exist") as info:
        load_agent_config(tmp_path / "missing.toml")
    assert info.value.code == "agent_config"
    with pytest.raises(AgentConfigError, match="not a regular file"):
        load_agent_config(tmp_path)
    path.write_text("colour = 1\n" + MINIMAL)
    with pytest.raises(AgentConfigError, match=rf"^{path}: colour: unknown key$"):
        load_agent_config(path)


def test_the_documented_example_loads() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    start = docs.index("## Agent (")
    end = docs.find("\n## ", start)  # the agent.toml section only, not the attestors' after it
    section = docs[start : end if end != -1 else len(docs)]
    example = section[section.index("```toml\n") + 8 : section.index("```", section.index("```toml\n") + 8)]
    # The example reads its token from a file this machine does not have.
    example = example.replace('token_file = "/etc/custos/join-token"', f'token = "{TOKEN}"')
    config = agent_config_from_toml(example)
    assert config.custody.tiers == ("tpm", "pkcs11", "memory")
    assert config.agent_key_custody == "tpm"
    assert config.workload_attestor_plugins() == [
        PluginConfig("unix", {"discover_workload_path": True})
    ]
    # Every key of the table is one the model knows.
    for key in re.findall(r"^\| `([a-z_.<>]+)`", section, re.M):
        assert key.partition(".")[0] in AgentConfig.model_fields, key
