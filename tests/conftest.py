"""Shared test configuration. The swtpm / softhsm fixtures come from the
``custos`` pytest plugin (src/custos/testing/plugin.py), the same one our
users get."""

from __future__ import annotations

import os

# tpm2-tss logs every expected NV miss at ERROR; keep test output readable.
os.environ.setdefault("TSS2_LOG", "esys+none,fapi+none,tcti+none")


import pytest


@pytest.fixture(scope="session")
def docker_compose_file(custos_swtpm_compose_file: str) -> str:
    """pytest-docker's compose file for ``--custos-docker`` runs of this suite."""
    return custos_swtpm_compose_file
