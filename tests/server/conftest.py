"""Datastore fixtures: every test that takes ``store`` or ``store_url`` runs
against SQLite and against a real PostgreSQL (the plugin's ``postgres`` rig)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from custos.server.datastore import Datastore

TRUST_DOMAIN = "example.org"
AGENT = "spiffe://example.org/spire/agent/join_token/n1"


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'datastore.db'}"
    url: str = request.getfixturevalue("postgres_db")
    return url


@pytest.fixture
def store(store_url: str) -> Iterator[Datastore]:
    with Datastore.open(store_url, trust_domain=TRUST_DOMAIN) as ds:
        yield ds
