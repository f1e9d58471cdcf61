"""The agent runs one gRPC stack, grpclib (decision 0126; issue 9, "Agent RSS").

grpcio's C core alone is ~13 MiB of resident memory: ``import custos.agent.app`` (what
``custos agent run`` loads) must not pull in ``grpc`` (nor grpcio's tools or health
packages).  Checked in a fresh interpreter: this process has grpcio loaded already."""

from __future__ import annotations

import json
import subprocess
import sys

_PROBE = """
import json, sys
import custos.agent.app
import custos.cli.agent
print(json.dumps(sorted(sys.modules)))
"""
#: Top-level packages of grpcio and its companions.
GRPCIO = ("grpc", "grpc_tools", "grpc_health", "grpc_reflection", "grpc_status")


def _modules_after(probe: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    return list(json.loads(result.stdout.strip().splitlines()[-1]))


def test_the_agent_imports_no_grpcio() -> None:
    modules = _modules_after(_PROBE)
    loaded = sorted({m for m in modules if m.split(".")[0] in GRPCIO})
    assert loaded == [], loaded
    assert "grpclib.client" in modules  # the Agent API client is grpclib's


def test_the_agent_imports_no_server_module() -> None:
    # Not the Agent API's server half, and not the server's config either: what both
    # configuration files share is custos.config_fields (decision 0047).
    modules = _modules_after(_PROBE)
    assert [m for m in modules if m == "custos.server" or m.startswith("custos.server.")] == []
    assert "custos._proto.agent_v1_pb2_grpc" not in modules
    assert "custos.config_fields" in modules
