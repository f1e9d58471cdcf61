"""``custos plugins list [--output json]``: the real command in a child process lists
every attestor of the three entry-point groups (built-in, the example distribution
``make`` installs, and a third party on the path), with its kind and distribution."""

from __future__ import annotations

import json
import os
from importlib.metadata import entry_points
from pathlib import Path

from cli_runner import run_custos

GROUPS = {
    "custos.agent.node_attestors": ("agent_node_attestor", "agent node attestor"),
    "custos.server.node_attestors": ("server_node_attestor", "server node attestor"),
    "custos.workload_attestors": ("workload_attestor", "workload attestor"),
}


def third_party(root: Path, dist: str, lines: dict[str, list[str]]) -> dict[str, str]:
    """A distribution ``dist`` on a PYTHONPATH directory (a bare .dist-info: what pip
    leaves behind) with the given entry points; the env that puts it on the path."""
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    text = "".join(f"[{g}]\n" + "".join(f"{line}\n" for line in eps) for g, eps in lines.items())
    (info / "entry_points.txt").write_text(text)
    path = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {"PYTHONPATH": path}


def expected_rows() -> list[dict[str, object]]:
    rows = []
    for group, (kind, _) in GROUPS.items():
        for ep in sorted(entry_points(group=group), key=lambda e: e.name):
            rows.append(
                {
                    "name": ep.name,
                    "kind": kind,
                    "group": group,
                    "distribution": ep.dist.name if ep.dist else None,
                    "entry_point": ep.value,
                }
            )
    return rows


def test_json_lists_every_installed_attestor() -> None:
    done = run_custos("plugins", "list", "--output", "json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert rows == expected_rows()
    by = {(r["name"], r["kind"]): r["distribution"] for r in rows}
    for name in ("join_token", "tpm"):
        assert by[(name, "agent_node_attestor")] == "custos"
        assert by[(name, "server_node_attestor")] == "custos"
    for name in ("unix", "systemd", "k8s"):
        assert by[(name, "workload_attestor")] == "custos"
    # the worked example in examples/, installed by make as its own distribution
    assert by[("example", "workload_attestor")] == "custos-example-attestor"


def test_text_table() -> None:
    done = run_custos("plugins", "list")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "DISTRIBUTION", "ENTRY", "POINT"]
    assert len(lines) == 1 + len(expected_rows())
    example = next(line for line in lines if line.startswith("example "))
    assert "workload attestor" in example and "custos-example-attestor" in example
    assert any(
        line.startswith("tpm ") and "server node attestor" in line and " custos " in line
        for line in lines
    )


def test_a_third_party_distribution_is_listed_without_being_imported(tmp_path: Path) -> None:
    env = third_party(
        tmp_path,
        "acme-attestors",
        {
            "custos.agent.node_attestors": ["acme = acme_missing.agent:Agent"],
            "custos.server.node_attestors": ["acme = acme_missing.server:Server"],
            "custos.workload_attestors": ["acme_wl = acme_missing.wl:Wl"],
        },
    )
    done = run_custos("plugins", "list", "-o", "json", extra_env=env)
    assert done.returncode == 0, done.stderr
    rows = {(r["name"], r["kind"]): r for r in json.loads(done.stdout)}
    assert rows[("acme", "agent_node_attestor")]["distribution"] == "acme-attestors"
    assert rows[("acme", "server_node_attestor")]["entry_point"] == "acme_missing.server:Server"
    assert rows[("acme_wl", "workload_attestor")]["group"] == "custos.workload_attestors"


def test_a_name_registered_twice_is_plugin_duplicate(tmp_path: Path) -> None:
    env = third_party(tmp_path, "evil-unix", {"custos.workload_attestors": ["unix = evil:Unix"]})
    done = run_custos("plugins", "list", extra_env=env)
    assert done.returncode == 1
    assert done.stderr.startswith("error [plugin_duplicate]: workload attestor 'unix'")
    assert "evil-unix" in done.stderr


def test_help() -> None:
    done = run_custos("plugins", "list", "--help")
    assert done.returncode == 0
    assert "--output" in done.stdout
