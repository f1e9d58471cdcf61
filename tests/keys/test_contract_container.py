"""The key-store contract (test_contract.py) once more, against a swtpm running in a
container (``swtpm/docker-compose.yml`` through pytest-docker's ``docker_services``,
the ``swtpm_container`` fixture of tests/conftest.py).

Only the ``tpm`` backend: the module's ``store_env`` replaces the conftest's
parametrized one, so each contract test runs once here. One xdist worker runs the
whole module (``xdist_group``; ``make test`` passes ``--dist loadgroup``), so one
container serves it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import test_contract

from custos.keys import KeyStore, KeyStoreConfig, open_key_store

pytestmark = pytest.mark.xdist_group("swtpm-container")

# The very test functions of the contract, collected again in this module.
for _name in dir(test_contract):
    if _name.startswith("test_"):
        globals()[_name] = getattr(test_contract, _name)
del _name


@dataclass
class ContainerStoreEnv:
    """What the contract tests use of tests/keys/conftest.py's StoreEnv, for the
    ``tpm`` store on the container's TCTI."""

    config: KeyStoreConfig
    kind: str = "tpm"
    opened: list[KeyStore] = field(default_factory=list)

    def open(self) -> KeyStore:
        store = open_key_store(self.config)
        self.opened.append(store)
        return store

    def cli_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["CUSTOS_KEY_DIR"] = str(self.config.key_dir)
        env["CUSTOS_TCTI"] = self.config.tcti
        return env


@pytest.fixture
def store_env(swtpm_container: object, tmp_path: Path) -> Iterator[ContainerStoreEnv]:
    tcti = swtpm_container.tcti  # type: ignore[attr-defined]
    assert tcti.startswith("swtpm:host=127.0.0.1,port=")
    se = ContainerStoreEnv(KeyStoreConfig(store="tpm", tcti=tcti, key_dir=tmp_path / "keys"))
    yield se
    for store in se.opened:
        store.close()


def test_the_tpm_is_the_container(swtpm_container: object) -> None:
    """The TCTI reaches swtpm inside a container of the local image, not a local process."""
    import subprocess

    port = swtpm_container.port  # type: ignore[attr-defined]
    out = subprocess.run(
        ["docker", "ps", "--filter", f"publish={port}", "--format", "{{.Image}}"],
        capture_output=True, text=True, timeout=30, check=True,
    )
    assert out.stdout.strip().startswith("custos-swtpm:"), out.stdout
    # its state was provisioned by the container itself (EK certificates and CA)
    assert all(p.is_file() for p in swtpm_container.ek_ca_certs)  # type: ignore[attr-defined]


def test_the_compose_file_runs_the_local_image_and_installs_nothing(
    docker_compose_file: str, docker_image: str
) -> None:
    """`docker-compose config` resolves the service to the locally built image (never a
    registry's), with no build step, and the container's command installs nothing."""
    import subprocess

    env = {**os.environ, "CUSTOS_SWTPM_IMAGE": docker_image}
    out = subprocess.run(
        ["docker-compose", "-f", docker_compose_file, "config"],
        capture_output=True, text=True, timeout=60, check=True, env=env,
    ).stdout
    assert f"image: {docker_image}" in out
    assert "build:" not in out
    assert "apt-get" not in out and "apt " not in out
    default = subprocess.run(
        ["docker-compose", "-f", docker_compose_file, "config"],
        capture_output=True, text=True, timeout=60, check=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("CUSTOS_SWTPM_")},
    ).stdout
    assert "image: custos-swtpm:local" in default
    assert "127.0.0.1" in default  # ports published on loopback only
