"""Fixtures of the tpm attestor tests (the rig is in tpm_attestor_rig.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tpm_attestor_rig import TD, Rig

from custos.server.datastore import Datastore
from custos.testing.swtpm import SwtpmInstance


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Datastore]:
    with Datastore.open(f"sqlite:///{tmp_path / 'datastore.db'}", trust_domain=TD) as ds:
        yield ds


@pytest.fixture
def rig(swtpm: SwtpmInstance, store: Datastore, tmp_path: Path) -> Rig:
    return Rig(swtpm, store, tmp_path)


@pytest.fixture
def own_rig(swtpm_factory: Callable[..., SwtpmInstance], store: Datastore, tmp_path: Path) -> Rig:
    """A TPM of the test's own: PCRs may be extended."""
    return Rig(swtpm_factory(), store, tmp_path)
