"""The ``custos`` pytest plugin (entry point ``pytest11``): the only module of
:mod:`custos.testing` that imports pytest. The rigs themselves
(:mod:`custos.testing.swtpm`, :mod:`custos.testing.softhsm`) do not, so the demo
and ``swtpm/provision.sh`` run without a test framework.

Fixtures:

- ``swtpm`` (session): a provisioned swtpm with EK and platform certificates;
  yields :class:`custos.testing.swtpm.SwtpmInstance` (``tcti``, ``ek_ca_certs``...).
- ``swtpm_factory`` (function): starts extra, fresh TPMs for tests that kill
  or need a pristine device.
- ``softhsm`` (function): a fresh, empty SoftHSM2 token for each test, in the
  session's private ``SOFTHSM2_CONF``; yields
  :class:`custos.testing.softhsm.SoftHSMToken` (``module``, ``uri``, ``token_label``,
  ``pin``...). About 15 ms each (softhsm2-util), plus one library
  re-initialization when a store first opens it.
- ``postgres`` (session) / ``postgres_db`` (function): a throwaway PostgreSQL
  server (:mod:`custos.testing.postgres`) and a fresh database URL on it per test.
- ``server_rig_factory`` / ``server_config_factory`` (function): a custos server
  configuration with free ports in a short private directory
  (:class:`custos.testing.server.ServerRig`); ``server_config_factory(datastore_url=None,
  **rig_options)`` returns its :class:`~custos.server.config.ServerConfig` (SQLite by
  default, or give ``postgres_db``'s URL), ``server_rig_factory`` the rig itself (for
  :class:`~custos.testing.server.ServerProcess`). Run one in the test's loop with
  ``async with running_server(config) as srv``.
- ``softhsm_session`` (session): one token shared by the whole session (per
  xdist worker), for test modules that create many keys and do not need an
  empty token (give keys unique names).

With ``--custos-docker`` (and pytest-docker plus a Docker engine) swtpm runs
from ``swtpm/docker-compose.yml`` instead of as a local process: the
``custos_swtpm_compose_file`` fixture names the file, and your conftest points
pytest-docker's ``docker_compose_file`` at it (the plugin does not define that
fixture, so it never replaces a project's own compose file).
custos' own ``make test`` starts a Docker engine and runs the key-store contract
once against such a container (its ``swtpm_container`` fixture, tests/conftest.py).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from custos.server.config import ServerConfig
from custos.testing.postgres import PostgresServer, start_postgres
from custos.testing.server import ServerRig
from custos.testing.softhsm import SoftHSMToken, find_module, init_token, write_config
from custos.testing.swtpm import (
    DockerSwtpm,
    SwtpmError,
    SwtpmInstance,
    copy_state,
    ctrl_answers,
    provision,
    shared_template,
    start_instance,
)

SwtpmFactory = Callable[..., SwtpmInstance]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("custos")
    group.addoption(
        "--custos-docker",
        action="store_true",
        default=False,
        help="run swtpm in a container through pytest-docker instead of a local process",
    )


# ---- swtpm -------------------------------------------------------------------


def _session_shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory all xdist workers of this session share.

    Under pytest-xdist every worker's basetemp is ``<session>/popen-gwN``, so the
    parent is per session and shared; without xdist it is the basetemp itself.
    """
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def custos_swtpm_compose_file(pytestconfig: pytest.Config) -> str:
    """The compose file with the ``swtpm`` service: ``swtpm/docker-compose.yml``
    of the checkout pytest runs in.

    Named apart from pytest-docker's own ``docker_compose_file`` on purpose: a
    plugin that defined that fixture would replace the compose file of every
    project that merely has custos installed. A project that wants the
    container path defines ``docker_compose_file`` in its conftest (returning
    this fixture's value, or its own file with a ``swtpm`` service).
    """
    return str(pytestconfig.rootpath / "swtpm" / "docker-compose.yml")


def _docker_swtpm(request: pytest.FixtureRequest) -> DockerSwtpm:
    try:
        services = request.getfixturevalue("docker_services")
    except pytest.FixtureLookupError as e:
        raise SwtpmError(
            "--custos-docker needs pytest-docker (pip install 'custos[docker]') and a Docker engine"
        ) from e
    port = int(services.port_for("swtpm", 2321))
    services.wait_until_responsive(check=lambda: ctrl_answers(port + 1), timeout=180.0, pause=1.0)
    compose = Path(request.getfixturevalue("custos_swtpm_compose_file"))
    return DockerSwtpm(port, compose.parent / "state", compose)


@pytest.fixture(scope="session")
def swtpm(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SwtpmInstance | DockerSwtpm]:
    """A provisioned swtpm for the whole session (per xdist worker).

    With ``--custos-docker`` it runs in a container through pytest-docker instead.
    """
    if request.config.getoption("--custos-docker", default=False):
        yield _docker_swtpm(request)
        return
    template = shared_template(_session_shared_dir(tmp_path_factory))
    state = copy_state(template, tmp_path_factory.mktemp("swtpm") / "state")
    inst = start_instance(state.root)
    try:
        yield inst
    finally:
        inst.stop()


@pytest.fixture
def swtpm_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SwtpmFactory]:
    """Start extra private TPMs; ``swtpm_factory(new_identity=True)`` provisions a new EK
    (about 1 s) instead of copying the session template. All are stopped at teardown."""
    started: list[SwtpmInstance] = []

    def make(*, new_identity: bool = False) -> SwtpmInstance:
        dest = tmp_path_factory.mktemp("swtpm-extra") / "state"
        state = (
            provision(dest)
            if new_identity
            else copy_state(shared_template(_session_shared_dir(tmp_path_factory)), dest)
        )
        inst = start_instance(state.root)
        started.append(inst)
        return inst

    try:
        yield make
    finally:
        for inst in started:
            inst.stop()


# ---- SoftHSM2 ------------------------------------------------------------------


@pytest.fixture(scope="session")
def softhsm_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHSMToken]:
    """One SoftHSM2 token for the test session (per xdist worker), in a private
    ``SOFTHSM2_CONF`` that stays set in ``os.environ`` for the whole session
    (SoftHSM reads it once per process, at ``C_Initialize``; children inherit it)."""
    module = find_module()
    conf = write_config(tmp_path_factory.mktemp("softhsm"))
    saved = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    try:
        yield init_token(module, conf, "custos-session")
    finally:
        if saved is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = saved


_token_numbers = itertools.count(1)


@pytest.fixture
def softhsm(softhsm_session: SoftHSMToken) -> SoftHSMToken:
    """A fresh, empty SoftHSM2 token for this test.

    It lives in the session's private config (a new config per test would not be
    seen by a process whose PKCS#11 library is already initialized); a store that
    opens it re-initializes the library once to find it, as it does for any token
    made after start-up. Tokens are left in the session's temporary directory
    rather than deleted: a token removed under an initialized library breaks
    slot enumeration in that process until its next ``C_Initialize``.
    """
    return softhsm_session.new_token(f"custos-test-{next(_token_numbers)}")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server for the session (per xdist worker), run as
    ``nobody`` when we are root; :meth:`PostgresServer.url` gives a
    ``postgresql+psycopg://`` URL. Stopped and removed at session end."""
    server = start_postgres()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def postgres_db(postgres: PostgresServer) -> Iterator[str]:
    """The URL of a fresh, empty database on the session's server (dropped after)."""
    url = postgres.create_database()
    try:
        yield url
    finally:
        postgres.drop_database(url.rsplit("/", 1)[1])


# ---- custos server -------------------------------------------------------------

ServerRigFactory = Callable[..., ServerRig]


@pytest.fixture
def server_rig_factory() -> Iterator[ServerRigFactory]:
    """``make(datastore_url=None, trust_domain="example.org", with_http=False,
    sections={...})`` -> :class:`ServerRig` in a fresh short temp directory (removed
    at teardown; stop the servers you started first)."""
    made: list[ServerRig] = []

    def make(**options: object) -> ServerRig:
        rig = ServerRig.create(**options)
        made.append(rig)
        return rig

    try:
        yield make
    finally:
        for rig in made:
            rig.destroy()


@pytest.fixture
def server_config_factory(server_rig_factory: ServerRigFactory) -> Callable[..., ServerConfig]:
    """``make(datastore_url=None, **rig_options)`` -> a validated server configuration
    (see :class:`custos.testing.server.ServerRig`)."""

    def make(datastore_url: str | None = None, **options: object) -> ServerConfig:
        return server_rig_factory(datastore_url=datastore_url, **options).config()

    return make
