"""RFC 7512 ``module-path`` / ``module-name`` pick the PKCS#11 library (issue 7 item 13),
against the real SoftHSM module: the URI alone is enough, an explicit module must agree
with it, and a name that matches nothing (or a path that is not a library) is a clear
configuration error."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

import pytest

from custos.keys import KeyStoreConfig, StoreConfigError, open_key_store
from custos.keys.pkcs11 import Pkcs11KeyStore, resolve_module
from custos.keys.pkcs11_uri import Pkcs11Uri
from custos.testing.softhsm import SoftHSMToken


def _uri(token: SoftHSMToken, query: str) -> str:
    return f"pkcs11:token={quote(token.token_label)}?pin-value={token.pin}&{query}"


def test_module_path_in_the_uri_is_enough(softhsm: SoftHSMToken) -> None:
    uri = _uri(softhsm, f"module-path={softhsm.module}")
    with Pkcs11KeyStore(None, uri) as store:
        assert isinstance(store.list(), list)
    config = KeyStoreConfig(store="pkcs11", pkcs11_uri=uri)  # no pkcs11_module
    with open_key_store(config) as store:
        assert isinstance(store.list(), list)


def test_module_name_finds_the_library(softhsm: SoftHSMToken) -> None:
    # Debian's SoftHSM is libsofthsm2.so under /usr/lib/softhsm: RFC 7512's example form.
    assert resolve_module(None, Pkcs11Uri.parse("pkcs11:?module-name=softhsm2")) == (
        os.path.realpath(softhsm.module)
    )
    with Pkcs11KeyStore(None, _uri(softhsm, "module-name=softhsm2")) as store:
        assert isinstance(store.list(), list)


def test_explicit_module_must_agree_with_the_uri(softhsm: SoftHSMToken, tmp_path: Path) -> None:
    other = tmp_path / "libother.so"
    other.write_bytes(b"\x7fELF")
    with pytest.raises(StoreConfigError, match="module-name"):
        resolve_module(str(other), Pkcs11Uri.parse("pkcs11:?module-name=softhsm2"))
    with pytest.raises(StoreConfigError, match="module-path"):
        resolve_module(str(other), Pkcs11Uri.parse(f"pkcs11:?module-path={softhsm.module}"))
    # Agreeing: the same file through a symlink and directly, and the name of the file.
    assert resolve_module(softhsm.module, Pkcs11Uri.parse("pkcs11:?module-name=softhsm2"))
    assert resolve_module(
        os.path.realpath(softhsm.module), Pkcs11Uri.parse(f"pkcs11:?module-path={softhsm.module}")
    ) == os.path.realpath(softhsm.module)


@pytest.mark.parametrize(
    "query",
    [
        "module-name=no-such-module-here",
        "module-name=../softhsm/libsofthsm2",  # a name, not a path
        "module-name=",
        "module-path=relative/libsofthsm2.so",
        "module-path=/nonexistent/libx.so",
        "module-path=/dev/zero",
        "module-path=/tmp",
    ],
)
def test_bad_module_selection_is_a_config_error(query: str) -> None:
    with pytest.raises(StoreConfigError) as info:
        resolve_module(None, Pkcs11Uri.parse(f"pkcs11:?{query}"))
    assert info.value.code in ("key_store_config", "pkcs11_uri_invalid")


def test_no_module_anywhere_is_a_config_error() -> None:
    with pytest.raises(StoreConfigError, match="module"):
        resolve_module(None, Pkcs11Uri.parse("pkcs11:token=t"))
