"""The ``custos`` pytest plugin (entry point ``pytest11``).

Fixtures:

- ``swtpm`` (session): a provisioned swtpm with EK and platform certificates;
  yields :class:`custos.testing.swtpm.SwtpmInstance` (``tcti``, ``ek_ca_certs``...).
- ``swtpm_factory`` (function): starts extra, fresh TPMs for tests that kill
  or need a pristine device.
- ``softhsm`` (session): a private SOFTHSM2_CONF and a fresh token; yields
  :class:`custos.testing.softhsm.SoftHSMToken` (``module``, ``token_label``, ``pin``...).

With ``--custos-docker`` (and pytest-docker plus a Docker engine) swtpm runs
from ``swtpm/docker-compose.yml`` instead of as a local process: the
``custos_swtpm_compose_file`` fixture names the file, and your conftest points
pytest-docker's ``docker_compose_file`` at it (the plugin does not define that
fixture, so it never replaces a project's own compose file).
That path is not exercised in custos' own CI: its machines run no Docker engine.
"""

from __future__ import annotations

import pytest

from custos.testing.softhsm import softhsm  # noqa: F401  (fixture re-export)
from custos.testing.swtpm import (  # noqa: F401  (fixture re-export)
    custos_swtpm_compose_file,
    swtpm,
    swtpm_factory,
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("custos")
    group.addoption(
        "--custos-docker",
        action="store_true",
        default=False,
        help="run swtpm in a container through pytest-docker instead of a local process",
    )
