"""Attestor plugins are found through entry points, exactly as a third party's would be.

Each test installs a tiny distribution (a real ``.dist-info`` directory) on sys.path.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from plugin_site import install_dist

from custos.plugin import DuplicatePluginError, PluginLoadError, discover, load


def test_third_party_attestor_is_discovered_and_loaded(site: Path) -> None:
    install_dist(
        site,
        "acme_attestors",
        "[custos.workload_attestors]\nacme_cgroup = acme_cgroup:Attestor\n",
        {"acme_cgroup": "class Attestor:\n    name = 'acme_cgroup'\n"},
    )
    names = [p.name for p in discover("workload_attestor")]
    assert "acme_cgroup" in names
    info = next(p for p in discover("workload_attestor") if p.name == "acme_cgroup")
    assert info.distribution == "acme_attestors" and info.value == "acme_cgroup:Attestor"
    assert load("workload_attestor", "acme_cgroup").name == "acme_cgroup"  # type: ignore[attr-defined]


def test_same_name_from_two_distributions_is_refused(site: Path) -> None:
    install_dist(
        site,
        "acme_one",
        "[custos.server.node_attestors]\nclash = acme_one:A\n",
        {"acme_one": "A = 1\n"},
    )
    install_dist(
        site,
        "acme_two",
        "[custos.server.node_attestors]\nclash = acme_two:B\n",
        {"acme_two": "B = 2\n"},
    )
    with pytest.raises(DuplicatePluginError, match="clash"):
        discover("server_node_attestor")


def test_broken_plugin_error_is_reported_not_swallowed(site: Path) -> None:
    install_dist(
        site,
        "acme_broken",
        "[custos.server.node_attestors]\nbroken = acme_broken:X\n",
        {"acme_broken": "raise RuntimeError('boom at import')\n"},
    )
    with pytest.raises(PluginLoadError, match=r"broken.*boom at import") as exc:
        load("server_node_attestor", "broken")
    assert isinstance(exc.value.__cause__, RuntimeError)


def test_unknown_plugin_names_what_is_installed(site: Path) -> None:
    with pytest.raises(PluginLoadError, match="no server node attestor named 'nope'"):
        load("server_node_attestor", "nope")


def test_load_refuses_a_name_two_distributions_register(site: Path) -> None:
    # Defect (issue 7, item 2): load() took the first entry point with the name
    # while discover() refused the same ambiguity.
    install_dist(
        site,
        "acme_one",
        "[custos.server.node_attestors]\nclash = acme_one:A\n",
        {"acme_one": "A = 1\n"},
    )
    install_dist(
        site,
        "acme_two",
        "[custos.server.node_attestors]\nclash = acme_two:B\n",
        {"acme_two": "B = 2\n"},
    )
    with pytest.raises(DuplicatePluginError, match=r"clash.*acme_(one|two).*acme_(one|two)"):
        load("server_node_attestor", "clash")
    assert "acme_one" not in sys.modules and "acme_two" not in sys.modules
