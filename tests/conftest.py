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


# ---- Docker: the engine, the test image, swtpm in a container (issue 11, decision 0100) ----
#
# `make test` starts dockerd (unless it runs) and builds the image before pytest, and
# stops what it started afterwards. Run directly, these fixtures need an engine already
# running (`make docker-up`): they fail with that instruction, they do not skip.


@pytest.fixture(scope="session")
def docker_compose_command() -> str:
    """pytest-docker runs Debian's docker-compose (v1): docker.io has no compose plugin."""
    return "docker-compose"


@pytest.fixture(scope="session")
def docker_setup() -> list[str]:
    # docker-compose v1 has no `up --wait` (pytest-docker's default); the fixture waits.
    return ["up -d"]


@pytest.fixture(scope="session")
def docker_cleanup() -> list[str]:
    return ["down -v"]


@pytest.fixture(scope="session")
def docker_image() -> str:
    """The local test image's tag (custos-swtpm:<hash>), built once if it is missing."""
    from custos.testing.docker import ensure_image, require_engine

    require_engine()
    return ensure_image(log=False).tag


@pytest.fixture(scope="session")
def swtpm_container(
    request: pytest.FixtureRequest,
    docker_image: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> object:
    """swtpm in a container from ``swtpm/docker-compose.yml`` through pytest-docker's
    ``docker_services``, on a loopback port pair this fixture picks, its state
    provisioned by the container itself in a fresh directory. Yields a
    :class:`custos.testing.swtpm.DockerSwtpm` (``tcti``, ``port``, ``ek_ca_certs``).

    Mark the tests that use it ``xdist_group("swtpm-container")`` so one worker runs
    the container (``make test`` passes ``--dist loadgroup``)."""
    from pathlib import Path

    from custos.testing.swtpm import DockerSwtpm, ctrl_answers, free_port_pair

    port = free_port_pair()
    state = tmp_path_factory.mktemp("swtpm-container") / "state"
    # Read by docker-compose when pytest-docker runs it (kept for the session: the
    # `down` at session end reads the same file).
    os.environ["CUSTOS_SWTPM_IMAGE"] = docker_image
    os.environ["CUSTOS_SWTPM_PORT"] = str(port)
    os.environ["CUSTOS_SWTPM_CTRL_PORT"] = str(port + 1)
    os.environ["CUSTOS_SWTPM_STATE"] = str(state)
    services = request.getfixturevalue("docker_services")
    published = int(services.port_for("swtpm", 2321))
    assert published == port, (published, port)
    services.wait_until_responsive(check=lambda: ctrl_answers(port + 1), timeout=60.0, pause=0.2)
    compose = Path(request.getfixturevalue("docker_compose_file"))
    return DockerSwtpm(port, state, compose)
