"""The worked example (examples/custos-example-attestor), installed in the venv by
``make`` as a separate distribution, is found and run through its entry point."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest
from acme_source import AGENT_HALF, ENTRY_POINTS, PLUGINS
from plugin_site import install_dist

from custos.plugin import (
    AgentCatalog,
    PeerCredentials,
    PluginCallError,
    PluginConfig,
    Selector,
    discover,
)

NODE = (PluginConfig("acme_node"),)  # an agent needs exactly one node attestor


@pytest.fixture
def node(site: Path) -> None:
    install_dist(
        site, "acme_plugins", ENTRY_POINTS, {"acme_plugins": PLUGINS, "acme_agent_half": AGENT_HALF}
    )


def test_the_example_is_installed_as_its_own_distribution() -> None:
    info = next(p for p in discover("workload_attestor") if p.name == "example")
    assert info.distribution == "custos-example-attestor"
    assert info.value == "custos_example_attestor:ProcessNameAttestor"


def test_the_example_attests_a_live_caller(node: None) -> None:
    child = subprocess.Popen(["sleep", "60"])
    fd = os.pidfd_open(child.pid)
    try:
        peer = PeerCredentials(pid=child.pid, uid=os.getuid(), gid=os.getgid(), pidfd=fd)
        example = PluginConfig("example", {"report_uid": True})
        with AgentCatalog.load(
            "example.org", node_attestors=NODE, workload_attestors=[example]
        ) as catalog:
            got = asyncio.run(catalog.attest_workload(peer))
    finally:
        child.kill()
        child.wait()
        os.close(fd)
    assert got == (Selector("example", "comm:sleep"), Selector("example", f"uid:{os.getuid()}"))


def test_a_caller_that_is_gone_is_a_named_plugin_error(node: None) -> None:
    child = subprocess.Popen(["sleep", "60"])
    fd = os.pidfd_open(child.pid)
    child.kill()
    child.wait()  # reaped: /proc/<pid> is gone
    try:
        peer = PeerCredentials(pid=child.pid, uid=os.getuid(), gid=os.getgid(), pidfd=fd)
        with AgentCatalog.load(
            "example.org", node_attestors=NODE, workload_attestors=[PluginConfig("example")]
        ) as catalog:
            with pytest.raises(PluginCallError, match="'example' failed in attest") as exc:
                asyncio.run(catalog.attest_workload(peer))
    finally:
        os.close(fd)
    assert exc.value.plugin == "example"


def test_the_example_refuses_unknown_settings(node: None) -> None:
    with pytest.raises(PluginCallError, match=r"'example' failed in configure.*unknown settings"):
        AgentCatalog.load(
            "example.org",
            node_attestors=NODE,
            workload_attestors=[PluginConfig("example", {"reportuid": True})],
        )
