"""Plugins are installed for these tests as a third party's would be: a tiny
distribution (a real ``.dist-info`` directory with ``entry_points.txt``) put on
sys.path.  Test modules are named ``acme_*`` and forgotten after each test."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from plugin_site import install_dist

__all__ = ["install_dist"]


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield tmp_path
    for mod in [m for m in sys.modules if m.startswith("acme_")]:
        del sys.modules[mod]
