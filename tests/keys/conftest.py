"""Key-store fixtures: one factory per backend so the contract suite runs the
same tests against every store (SPIRE runs one shared suite per key manager)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from custos.keys import KeyStore, KeyStoreConfig, open_key_store

STORE_KINDS = ["memory", "exportable", "tpm", "pkcs11"]


@dataclass
class StoreEnv:
    """How to open (again) one backend, in this process or in a child process."""

    kind: str
    config: KeyStoreConfig
    env: dict[str, str] = field(default_factory=dict)
    opened: list[KeyStore] = field(default_factory=list)

    def open(self) -> KeyStore:
        store = open_key_store(self.config)
        self.opened.append(store)
        return store

    def cli_env(self) -> dict[str, str]:
        """Environment for `custos keys ...` in a child process."""
        env = dict(os.environ)
        env.update(self.env)
        env["CUSTOS_KEY_DIR"] = str(self.config.key_dir)
        env["CUSTOS_TCTI"] = self.config.tcti
        if self.config.pkcs11_module:
            env["CUSTOS_PKCS11_MODULE"] = self.config.pkcs11_module
        if self.config.pkcs11_uri:
            env["CUSTOS_PKCS11_URI"] = self.config.pkcs11_uri
        return env


@pytest.fixture(params=STORE_KINDS)
def store_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreEnv]:
    kind: str = request.param
    key_dir = tmp_path / "keys"
    if kind in ("memory", "exportable"):
        se = StoreEnv(kind, KeyStoreConfig(store=kind, key_dir=key_dir))  # type: ignore[arg-type]
    elif kind == "tpm":
        tpm = request.getfixturevalue("swtpm")
        se = StoreEnv(kind, KeyStoreConfig(store="tpm", tcti=tpm.tcti, key_dir=key_dir))
    else:
        hsm = request.getfixturevalue("softhsm")
        se = StoreEnv(
            kind,
            KeyStoreConfig(store="pkcs11", pkcs11_module=hsm.module, pkcs11_uri=hsm.uri),
            env=dict(hsm.env),
        )
    yield se
    for store in se.opened:
        # Tidy the token: it is fresh per test, but its files stay in the session's
        # directory (softhsm_session) until the session ends.
        if kind == "pkcs11":
            for info in store.list():
                if info.name.startswith("ct-"):
                    store.delete(info.name)
        store.close()


@pytest.fixture
def store(store_env: StoreEnv) -> KeyStore:
    return store_env.open()


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """Key names unique per test.

    The ``softhsm`` token is fresh per test (only ``softhsm_session``, the SoftHSM
    config and its directory, is shared), but the ``swtpm`` is one per session and
    its persistent handles outlive a test, so names never repeat."""
    import uuid

    def make(prefix: str = "k") -> str:
        return f"ct-{prefix}-{uuid.uuid4().hex[:10]}"

    return make
