"""Hostile inputs to the key stores (issue 7, items 6, 9 and 13): every one ends in a
clear custos error with a stable code, never a hang, a MemoryError or a traceback.

- item 6: errors carry their class, not only a code (``except UnsupportedAlgorithmError``
  catches what the software store raises; a closed store has ``StoreClosedError``);
- item 9: a PIN source or an exportable key file that is a FIFO, ``/dev/zero``, a
  directory or a huge file is refused at once;
- item 13: RFC 7512 numbers are ASCII digits only.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, x25519

from custos.errors import CustosError
from custos.keys import (
    Algorithm,
    ExportableKeyStore,
    KeyStoreError,
    MemoryKeyStore,
    UnsupportedAlgorithmError,
)
from custos.keys.errors import KeyFileError, StoreClosedError
from custos.keys.pkcs11_uri import Pkcs11Uri, Pkcs11UriError
from custos.keys.software import algorithm_of, sign_digest_with

# ---- item 6: one class per condition ------------------------------------------------------


def test_unsupported_key_type_is_an_unsupported_algorithm_error() -> None:
    dsa_key = dsa.generate_private_key(1024)
    with pytest.raises(UnsupportedAlgorithmError) as info:
        algorithm_of(dsa_key)  # type: ignore[arg-type]
    assert info.value.code == "unsupported_algorithm"
    with pytest.raises(UnsupportedAlgorithmError):
        MemoryKeyStore().import_key("dsa", dsa_key)  # type: ignore[arg-type]


def test_eddsa_digest_signing_is_an_unsupported_algorithm_error() -> None:
    with pytest.raises(UnsupportedAlgorithmError):
        sign_digest_with(ed25519.Ed25519PrivateKey.generate(), Algorithm.ES256, b"\0" * 32)


def test_store_closed_has_its_own_class() -> None:
    err = StoreClosedError("closed")
    assert isinstance(err, KeyStoreError) and err.code == "store_closed"
    assert not isinstance(err, UnsupportedAlgorithmError)


# ---- item 9: files that are not small regular files ----------------------------------------


def _hostile(tmp_path: Path, kind: str, name: str) -> Path:
    """A path named ``name`` in ``tmp_path`` that is a FIFO, /dev/zero, a directory or huge."""
    path = tmp_path / name
    if kind == "fifo":
        os.mkfifo(path)  # no writer: a plain open() blocks forever
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")  # read() never ends
    elif kind == "directory":
        path.mkdir()
    else:
        with open(path, "wb") as f:  # sparse: no disk used; 64 times the 1 MiB cap
            f.truncate(64 << 20)
    return path


HOSTILE = ["fifo", "dev-zero", "directory", "huge"]


@pytest.mark.parametrize("kind", HOSTILE)
def test_pin_source_that_is_not_a_small_regular_file(tmp_path: Path, kind: str) -> None:
    path = _hostile(tmp_path, kind, "pin")
    for source in (f"file:{path}", str(path)):
        with pytest.raises(Pkcs11UriError) as info:
            Pkcs11Uri.parse(f"pkcs11:token=t?pin-source={source}").resolve_pin()
        assert str(path) in info.value.message
        assert info.value.code == "pkcs11_uri_invalid"


@pytest.mark.parametrize("kind", HOSTILE)
@pytest.mark.parametrize("suffix", [".pem", ".alg"])
def test_exportable_key_file_that_is_not_a_small_regular_file(
    tmp_path: Path, kind: str, suffix: str
) -> None:
    key_dir = tmp_path / "keys"
    ExportableKeyStore(key_dir).create("k", "ES256")
    target = key_dir / f"k{suffix}"
    target.unlink()
    _hostile(key_dir, kind, target.name)
    with pytest.raises(KeyFileError) as info:
        ExportableKeyStore(key_dir)
    assert info.value.code == "bad_key_file"
    assert f"k{suffix}" in info.value.message


def _write_pem(path: Path, key: object) -> None:
    path.write_bytes(
        key.private_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: dsa.generate_private_key(1024),
        lambda: x25519.X25519PrivateKey.generate(),
        lambda: ec.generate_private_key(ec.SECP521R1()),
    ],
    ids=["dsa", "x25519", "p521"],
)
def test_exportable_key_of_a_type_custos_does_not_use(tmp_path: Path, make: object) -> None:
    _write_pem(tmp_path / "odd.pem", make())  # type: ignore[operator]
    with pytest.raises(KeyFileError, match=r"odd\.pem"):
        ExportableKeyStore(tmp_path)


def test_exportable_alg_file_that_contradicts_the_key(tmp_path: Path) -> None:
    _write_pem(tmp_path / "k.pem", ec.generate_private_key(ec.SECP256R1()))
    (tmp_path / "k.alg").write_text("EdDSA")
    with pytest.raises(KeyFileError, match=r"k\.alg"):
        ExportableKeyStore(tmp_path)
    (tmp_path / "k.alg").write_text("HS256")
    with pytest.raises(KeyFileError, match=r"k\.alg"):
        ExportableKeyStore(tmp_path)
    (tmp_path / "k.alg").write_bytes(b"\xff\xfe")
    with pytest.raises(KeyFileError, match=r"k\.alg"):
        ExportableKeyStore(tmp_path)


def test_exportable_key_dir_that_is_a_file(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(KeyStoreError) as info:
        ExportableKeyStore(not_a_dir).create("k", "ES256")
    assert isinstance(info.value, CustosError)


def test_exportable_store_does_not_create_its_directory_until_a_key_is_made(
    tmp_path: Path,
) -> None:
    key_dir = tmp_path / "not" / "yet"
    store = ExportableKeyStore(key_dir)
    assert store.list() == []
    assert not (tmp_path / "not").exists()  # read-only use makes no directory
    store.create("k", "ES256")
    assert key_dir.is_dir() and (key_dir.stat().st_mode & 0o077) == 0


# ---- item 13: RFC 7512 numbers are ASCII digits ------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "%D9%A1%D9%A2",  # Arabic-Indic "12": int() accepts it
        "%C2%B2",  # superscript two: isdigit() says yes, int() raises
        "%201",  # " 1"
        "1%20",
        "1_0",
        "+1",
        "-1",
        "",
        "1" * 5000,  # past int()'s digit limit: a ValueError, not a refusal, today
        "18446744073709551616",  # 2**64: no CK_SLOT_ID is that large
    ],
)
def test_slot_id_must_be_ascii_digits(value: str) -> None:
    with pytest.raises(Pkcs11UriError, match="slot-id"):
        Pkcs11Uri.parse(f"pkcs11:slot-id={value}")


@pytest.mark.parametrize("value", ["%D9%A1.%D9%A2", "1.%C2%B2", "1_0", "+1.2", "1." + "2" * 5000])
def test_library_version_must_be_ascii_digits(value: str) -> None:
    with pytest.raises(Pkcs11UriError, match="library-version"):
        Pkcs11Uri.parse(f"pkcs11:library-version={value}")


def test_ascii_numbers_still_parse() -> None:
    assert Pkcs11Uri.parse("pkcs11:slot-id=0").slot_id == 0
    assert Pkcs11Uri.parse("pkcs11:slot-id=18446744073709551615").slot_id == 2**64 - 1
    assert Pkcs11Uri.parse("pkcs11:library-version=2.6").library_version == "2.6"


# ---- NUL bytes in paths: a clear refusal, not ValueError("embedded null byte") -------------


@pytest.mark.parametrize("attribute", ["pin-source", "module-path", "module-name"])
def test_nul_or_control_characters_in_uri_paths(attribute: str) -> None:
    for value in ("/tmp/a%00b", "/tmp/a%0Ab"):
        with pytest.raises(Pkcs11UriError, match=attribute):
            Pkcs11Uri.parse(f"pkcs11:token=t?{attribute}={value}")


def test_nul_in_a_module_or_key_directory_path() -> None:
    from custos.keys import KeyStoreConfig, StoreConfigError
    from custos.keys.pkcs11 import resolve_module

    with pytest.raises(StoreConfigError, match="module"):
        resolve_module("/usr/lib/a\0b.so", Pkcs11Uri.parse("pkcs11:token=t"))
    with pytest.raises(StoreConfigError, match="key_dir"):
        KeyStoreConfig.from_env("exportable", key_dir="/tmp/a\0b")
    with pytest.raises(StoreConfigError):
        ExportableKeyStore("/tmp/a\0b")
