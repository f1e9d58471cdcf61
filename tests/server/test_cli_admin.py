"""``custos entry|token|agent|bundle`` and ``custos server rotate-keys`` through
click's runner against a real server (its admin socket), the JSON shapes of
docs/cli.md, and bad input refused with one line before anything is written."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from cryptography import x509

from custos.bundle import TrustBundle
from custos.cli.main import cli
from custos.testing.server import READY_LINE, ServerRig, free_port

from .test_admin_api import ServerThread

README = Path(__file__).resolve().parents[2] / "README.md"
TD = "example.org"
AGENT = f"spiffe://{TD}/custos/agent/join_token/cli"
ENTRY_KEYS = {
    "id",
    "spiffe_id",
    "parent_id",
    "selectors",
    "x509_svid_ttl",
    "jwt_svid_ttl",
    "wit_ttl",
    "dns_names",
    "key_custody",
    "hint",
    "admin",
    "downstream",
    "expires_at",
    "revision",
    "require_residency",
}


@pytest.fixture(scope="module")
def rig() -> Iterator[ServerRig]:
    made = ServerRig.create()
    yield made
    made.destroy()


@pytest.fixture(scope="module")
def running(rig: ServerRig) -> Iterator[ServerThread]:
    with ServerThread(rig.config()) as thread:
        yield thread


def custos(running: ServerThread, *args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, [*args, "--admin-socket", running.socket], env=env)


def ok_json(running: ServerThread, *args: str) -> Any:
    result = custos(running, *args, "--output", "json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def refused(result: Result, code: str) -> str:
    """Exit 1 and exactly one line, ``error [code]: ...`` (decision 0001)."""
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error [{code}]: "), lines[0]
    assert result.stdout == ""
    return lines[0]


def _create(running: ServerThread, *extra: str, spiffe_id: str = "web") -> dict[str, Any]:
    made: dict[str, Any] = ok_json(
        running,
        "entry",
        "create",
        "--spiffe-id",
        f"spiffe://{TD}/{spiffe_id}",
        "--parent-id",
        AGENT,
        "--selector",
        "unix:uid:1001",
        *extra,
    )
    return made


# -- entry -----------------------------------------------------------------------------


def test_entry_create_twice_is_one_line(running: ServerThread) -> None:
    made = _create(running, spiffe_id="twice")
    args = ["--spiffe-id", f"spiffe://{TD}/twice", "--parent-id", AGENT]
    line = refused(
        custos(running, "entry", "create", *args, "--selector", "unix:uid:1001"), "entry_exists"
    )
    assert made["id"] in line


def test_entry_create_with_every_flag(running: ServerThread) -> None:
    made = _create(
        running,
        "--selector",
        "unix:gid:50",
        "--x509-ttl",
        "2h",
        "--jwt-ttl",
        "90s",
        "--wit-ttl",
        "1800",
        "--custody",
        "tpm",
        "--dns",
        "web.example.org",
        "--dns",
        "www.example.org",
        "--hint",
        "frontend",
        "--admin",
        "--downstream",
        "--expires-at",
        "2031-01-01T00:00:00Z",
        "--require-residency",
        spiffe_id="every-flag",
    )
    assert set(made) == ENTRY_KEYS
    assert made["require_residency"] is True
    assert made["selectors"] == ["unix:gid:50", "unix:uid:1001"]
    assert (made["x509_svid_ttl"], made["jwt_svid_ttl"], made["wit_ttl"]) == (7200, 90, 1800)
    assert made["dns_names"] == ["web.example.org", "www.example.org"]
    assert (made["key_custody"], made["hint"], made["admin"], made["downstream"]) == (
        "tpm",
        "frontend",
        True,
        True,
    )
    assert made["expires_at"] == 1924992000
    stored = running.server.ctx.datastore.entries.get(made["id"])
    assert stored.key_custody == "tpm" and stored.expires_at == 1924992000
    assert stored.require_residency is True


def test_require_residency_needs_tpm_custody_and_updates_alone(running: ServerThread) -> None:
    before = running.server.ctx.datastore.entries.count()
    refused(
        custos(
            running, "entry", "create", "--spiffe-id", f"spiffe://{TD}/resident",
            "--parent-id", AGENT, "--selector", "unix:uid:1001", "--require-residency",
        ),
        "residency_needs_tpm_custody",
    )  # fmt: skip
    assert running.server.ctx.datastore.entries.count() == before
    made = _create(running, "--custody", "tpm", spiffe_id="resident")
    assert made["require_residency"] is False
    assert "Residency" not in custos(running, "entry", "show", made["id"]).stdout
    required = ok_json(running, "entry", "update", made["id"], "--require-residency")
    assert (required["require_residency"], required["revision"]) == (True, 2)
    assert "Residency      : required" in custos(running, "entry", "show", made["id"]).stdout
    # An update that does not name the flag keeps it; one that drops tpm custody alone
    # is refused (the entry could never be served), with --no-require-residency it works.
    hinted = ok_json(running, "entry", "update", made["id"], "--hint", "h")
    assert hinted["require_residency"] is True
    refused(
        custos(running, "entry", "update", made["id"], "--custody", "memory"),
        "residency_needs_tpm_custody",
    )
    relaxed = ok_json(
        running, "entry", "update", made["id"], "--custody", "memory", "--no-require-residency"
    )
    assert (relaxed["require_residency"], relaxed["key_custody"]) == (False, "memory")
    listed = ok_json(running, "entry", "list", "--spiffe-id", made["spiffe_id"])
    assert listed["entries"][0]["require_residency"] is False


def test_entry_show_update_delete_pretty_and_json(running: ServerThread) -> None:
    made = _create(running, spiffe_id="cycle")
    shown = custos(running, "entry", "show", made["id"])
    assert shown.exit_code == 0
    assert f"Entry ID       : {made['id']}" in shown.stdout
    assert "X509-SVID TTL  : 1h" in shown.stdout
    assert ok_json(running, "entry", "show", made["id"]) == made

    # Only the flags given change; the revision read is the one sent.
    updated = ok_json(running, "entry", "update", made["id"], "--hint", "v2", "--x509-ttl", "30m")
    assert (updated["revision"], updated["hint"], updated["x509_svid_ttl"]) == (2, "v2", 1800)
    assert updated["selectors"] == made["selectors"]
    replaced = ok_json(
        running,
        "entry",
        "update",
        made["id"],
        "--selector",
        "k8s:ns:web",
        "--expires-at",
        "1924992000",
    )
    assert (replaced["selectors"], replaced["expires_at"]) == (["k8s:ns:web"], 1924992000)
    never = ok_json(running, "entry", "update", made["id"], "--expires-at", "never")
    assert never["expires_at"] is None
    # A revision given is a promise: the entry has not changed since.
    line = refused(
        custos(running, "entry", "update", made["id"], "--revision", "1", "--hint", "x"),
        "revision_conflict",
    )
    assert "read it again" in line
    refused(custos(running, "entry", "delete", made["id"], "--revision", "2"), "revision_conflict")

    assert ok_json(running, "entry", "delete", made["id"], "--revision", "4") == {
        "deleted": made["id"]
    }
    refused(custos(running, "entry", "show", made["id"]), "entry_not_found")


def test_entry_list_and_count(running: ServerThread) -> None:
    made = _create(running, spiffe_id="listed")
    listed = ok_json(running, "entry", "list", "--spiffe-id", made["spiffe_id"])
    assert listed == {"entries": [made]}
    by_selector = ok_json(
        running, "entry", "list", "--selector", "unix:uid:1001", "--match", "superset"
    )
    assert made["id"] in [e["id"] for e in by_selector["entries"]]
    pretty = custos(running, "entry", "list", "--spiffe-id", made["spiffe_id"])
    assert pretty.stdout.startswith("Found 1 entry\n")
    count = ok_json(running, "entry", "count")
    assert count == {"count": running.server.ctx.datastore.entries.count()}
    assert "registration entr" in custos(running, "entry", "count").stdout


@pytest.mark.parametrize(
    ("flags", "code"),
    [
        (["--spiffe-id", "spiffe://other.org/web"], "wrong_trust_domain"),
        (["--spiffe-id", "web"], "invalid_identifier"),
        (["--parent-id", "spiffe://example.org/a/../b"], "invalid_identifier"),
        (["--selector", "nocolon"], "invalid_selector"),
        (["--x509-ttl", "0"], "invalid_number"),
        (["--jwt-ttl", "-5m"], "invalid_number"),
        (["--wit-ttl", "nan"], "invalid_number"),
        (["--x509-ttl", "1y"], "invalid_number"),
        (["--expires-at", "tomorrow"], "invalid_time"),
        (["--expires-at", "1000"], "invalid_time"),
        (["--dns", "custos-server"], "reserved_dns_name"),
        (["--dns", "not a name"], "invalid_dns_name"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    running: ServerThread, flags: list[str], code: str
) -> None:
    before = running.server.ctx.datastore.entries.count()
    base = {
        "--spiffe-id": f"spiffe://{TD}/bad",
        "--parent-id": AGENT,
        "--selector": "unix:uid:1",
    }
    args = ["entry", "create"]
    for flag, value in base.items():
        if flag not in flags:
            args += [flag, value]
    refused(custos(running, *args, *flags), code)
    assert running.server.ctx.datastore.entries.count() == before


# -- token, agent, bundle, rotate-keys -----------------------------------------------------


def test_token_generate(running: ServerThread) -> None:
    made = ok_json(running, "token", "generate", "--ttl", "1h", "--spiffe-id", f"spiffe://{TD}/n1")
    assert set(made) == {"token", "token_id", "expires_at", "agent_id", "alias"}
    assert made["agent_id"] == f"spiffe://{TD}/custos/agent/join_token/{made['token_id']}"
    assert made["alias"]["parent_id"] == made["agent_id"]
    assert made["alias"]["selectors"] == [f"spiffe_id:{made['agent_id']}"]
    stored = running.server.ctx.datastore.join_tokens.get(made["token_id"])
    assert stored.expires_at - stored.created_at == 3600
    plain = custos(running, "token", "generate")
    assert plain.exit_code == 0 and plain.stdout.startswith("Token          : ")
    refused(custos(running, "token", "generate", "--ttl", "2d"), "invalid_number")
    refused(custos(running, "token", "generate", "--ttl", "48h"), "invalid_number")


def test_agent_commands(running: ServerThread) -> None:
    agent_id = f"spiffe://{TD}/custos/agent/join_token/cli-agent"
    running.server.ctx.datastore.agents.attested(
        agent_id, attestor="join_token", selectors=[], serial="7", expires_at=2e9
    )
    listed = ok_json(running, "agent", "list")
    assert agent_id in [a["id"] for a in listed["agents"]]
    shown = ok_json(running, "agent", "show", agent_id)
    assert set(shown) == {
        "id",
        "attestor",
        "selectors",
        "serial",
        "expires_at",
        "evicted",
        "banned",
        "updated_at",
        "attestation_key",
    }
    assert shown["attestation_key"] is None
    assert "Attestation key: none" in custos(running, "agent", "show", agent_id).stdout
    tpm_agent = f"spiffe://{TD}/custos/agent/tpm/{'ab' * 32}"
    running.server.ctx.datastore.agents.attested(
        tpm_agent, attestor="tpm", selectors=[], serial="8", expires_at=2e9,
        attestation_key=b"\x00\x02ak",
    )  # fmt: skip
    assert ok_json(running, "agent", "show", tpm_agent)["attestation_key"] == "AAJhaw=="
    digest = hashlib.sha256(b"\x00\x02ak").hexdigest()
    assert f"Attestation key: sha256:{digest}" in custos(running, "agent", "show", tpm_agent).stdout
    assert ok_json(running, "agent", "evict", agent_id)["evicted"] is True
    banned = custos(running, "agent", "ban", agent_id)
    assert banned.exit_code == 0 and "Banned         : true" in banned.stdout
    refused(custos(running, "agent", "show", f"spiffe://{TD}/custos/agent/x/y"), "agent_not_found")
    refused(custos(running, "agent", "evict", "not-an-id"), "invalid_identifier")


def test_bundle_show_formats(running: ServerThread) -> None:
    bundle = running.server.ctx.bundle()
    pem = custos(running, "bundle", "show", "--format", "pem")
    assert x509.load_pem_x509_certificates(pem.stdout.encode()) == list(bundle.x509_authorities)
    jwks = json.loads(custos(running, "bundle", "show", "--format", "jwks").stdout)
    assert {k["kid"] for k in jwks["keys"]} == {a.kid for a in bundle.jwt_authorities}
    spiffe = custos(running, "bundle", "show").stdout
    parsed = TrustBundle.from_spiffe_json(TD, spiffe)
    assert parsed.x509_authorities == bundle.x509_authorities
    wrapped = ok_json(running, "bundle", "show", "--format", "pem")
    assert set(wrapped) == {"trust_domain", "sequence_number", "format", "bundle"}
    assert wrapped["bundle"] == pem.stdout


def test_server_rotate_keys(running: ServerThread) -> None:
    made = ok_json(running, "server", "rotate-keys")
    ctx = running.server.ctx
    assert made == {
        "keys": [
            {"purpose": "x509-ca", "kid": ctx.ca_keys.current().kid},
            {"purpose": "jwt-svid", "kid": ctx.jwt_keys.current().kid},
            {"purpose": "wit", "kid": ctx.wit_keys.current().kid},
        ]
    }


# -- finding the server --------------------------------------------------------------------


def test_socket_from_env_url_and_from_config(running: ServerThread, rig: ServerRig) -> None:
    via_env = CliRunner().invoke(
        cli,
        ["entry", "count", "--output", "json"],
        env={"CUSTOS_ADMIN_SOCKET": f"unix://{running.socket}"},
    )
    assert via_env.exit_code == 0, via_env.output
    via_config = CliRunner().invoke(
        cli, ["entry", "count", "--config", str(rig.config_path), "--output", "json"]
    )
    assert json.loads(via_config.stdout) == json.loads(via_env.stdout)


def test_no_server_is_one_line(tmp_path: Any) -> None:
    result = CliRunner().invoke(
        cli, ["entry", "count", "--admin-socket", str(tmp_path / "admin.sock")]
    )
    line = refused(result, "admin_unreachable")
    assert "cannot reach the admin socket" in line


# -- the README's server tour --------------------------------------------------------------


def test_readme_server_tour_runs_as_written(tmp_path: Path) -> None:
    # The two shell blocks after "A server on this machine", with the data directory
    # in tmp_path and a free Agent API port (init's default 8081 may be taken).
    text = README.read_text()
    tour = text[text.index("A server on this machine") :]
    blocks = re.findall(r"```sh\n(.*?)```", tour, flags=re.DOTALL)[:2]
    data_dir = tmp_path / "srv"
    server_lines, admin_script = (b.replace("/tmp/custos-server", str(data_dir)) for b in blocks)
    init_line, run_line = server_lines.strip().splitlines()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    subprocess.run(["bash", "-euo", "pipefail", "-c", init_line], env=env, check=True)
    config = data_dir / "server.toml"
    assert '"127.0.0.1:8081"' in config.read_text()
    config.write_text(config.read_text().replace('"127.0.0.1:8081"', f'"127.0.0.1:{free_port()}"'))
    server = subprocess.Popen(
        ["bash", "-c", f"exec {run_line}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert server.stdout is not None
        for line in server.stdout:  # until `custos server run` says it is ready
            if READY_LINE in line:
                break
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", admin_script],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        server.terminate()
        server.wait(30)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Alias entry" in done.stdout
    assert '"spiffe_id": "spiffe://example.org/web"' in done.stdout
    assert "-----BEGIN CERTIFICATE-----" in done.stdout
