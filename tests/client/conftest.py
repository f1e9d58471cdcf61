"""The client is tested against WAPI's real Workload API server on a tmp socket:
its rig lives in tests/agent/test_workload_api.py (the way the agent's own
signing tests reuse it), and against a whole agent with NODE's fixtures of
tests/agent/test_agent_app.py; both made importable here."""

from __future__ import annotations

import sys
from pathlib import Path

_AGENT_TESTS = str(Path(__file__).resolve().parent.parent / "agent")
if _AGENT_TESTS not in sys.path:
    sys.path.insert(0, _AGENT_TESTS)

from test_agent_app import base, rig  # noqa: E402,F401  (fixtures: a server rig, a short dir)
from test_workload_api import plugin_site, wapi  # noqa: E402,F401  (fixtures)
