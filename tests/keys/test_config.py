"""``KeyStoreConfig``: a PIN in the PKCS#11 URI never shows in reprs, dumps or errors."""

from __future__ import annotations

import json
import uuid

import pytest
from pydantic import ValidationError

from custos.keys import KeyStoreConfig, StoreConfigError, open_key_store
from custos.keys.pkcs11_uri import Pkcs11Uri
from custos.testing.softhsm import SoftHSMToken


def _pin() -> str:
    return "pin" + uuid.uuid4().hex


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _assert_hidden(pin: str, exc: BaseException) -> None:
    for e in _chain(exc):
        assert pin not in str(e) and pin not in repr(e)
        if isinstance(e, ValidationError):
            assert pin not in json.dumps(e.errors(include_url=False), default=str)
            assert pin not in e.json()


def test_repr_str_and_json_hide_the_pin() -> None:
    pin = _pin()
    uri = f"pkcs11:token=custos?pin-value={pin}&x-pin={pin}"
    config = KeyStoreConfig(store="pkcs11", pkcs11_module="/usr/lib/x.so", pkcs11_uri=uri)
    for text in (repr(config), str(config), config.model_dump_json(), f"{config!r} {config}"):
        assert pin not in text, text
    # still useful to read: the token and the fact that a PIN is set
    assert "token=custos" in repr(config) and "pin-value=REDACTED" in repr(config)
    assert json.loads(config.model_dump_json())["pkcs11_uri"].startswith("pkcs11:token=custos")
    # the value itself is kept for use
    assert config.pkcs11_uri == uri
    assert Pkcs11Uri.parse(config.model_dump()["pkcs11_uri"]).pin_value == pin


def test_repr_of_an_unparseable_uri_hides_it() -> None:
    pin = _pin()
    config = KeyStoreConfig(store="pkcs11", pkcs11_uri=f"pkcs11:token=a%zz?pin-value={pin}")
    assert pin not in repr(config) and pin not in str(config)
    assert pin not in config.model_dump_json()


@pytest.mark.parametrize(
    "values",
    [
        {"store": "pkcs11", "tpm_loaded_keys": 99},  # a bad value elsewhere
        {"store": "banana"},  # a bad store kind
        {},  # no store at all: pydantic would echo the whole input
        {"store": "pkcs11", "unknown_option": "x"},  # extra="forbid"
        {"store": "pkcs11", "pkcs11_module": 42},
    ],
)
def test_validation_errors_do_not_echo_the_pin(values: dict[str, object]) -> None:
    pin = _pin()
    kwargs = {"pkcs11_uri": f"pkcs11:token=custos?pin-value={pin}", **values}
    with pytest.raises(ValidationError) as info:
        KeyStoreConfig(**kwargs)  # type: ignore[arg-type]
    _assert_hidden(pin, info.value)


@pytest.mark.parametrize("broken", ["truncated", "bad-value"])
def test_json_config_errors_do_not_echo_the_pin(broken: str) -> None:
    # A JSON syntax error is raised before any validator runs, with the whole
    # document (PIN included) as its input.
    pin = _pin()
    doc = json.dumps({"store": "pkcs11", "pkcs11_uri": f"pkcs11:token=a?pin-value={pin}"})
    doc = doc[:-1] if broken == "truncated" else doc.replace('"pkcs11"', '"banana"', 1)
    with pytest.raises(ValidationError) as info:
        KeyStoreConfig.model_validate_json(doc)
    _assert_hidden(pin, info.value)


def test_pin_as_the_wrong_field_is_not_echoed() -> None:
    pin = _pin()
    with pytest.raises(ValidationError) as info:
        KeyStoreConfig(store="pkcs11", pkcs11_uri=42, pin=pin)  # type: ignore[call-arg,arg-type]
    _assert_hidden(pin, info.value)


def test_from_env_error_does_not_echo_the_pin(monkeypatch: pytest.MonkeyPatch) -> None:
    pin = _pin()
    monkeypatch.setenv("CUSTOS_PKCS11_URI", f"pkcs11:token=custos?pin-value={pin}")
    monkeypatch.setenv("CUSTOS_TPM_LOADED_KEYS", "not-a-number")
    with pytest.raises(StoreConfigError) as info:
        KeyStoreConfig.from_env("pkcs11")
    assert "tpm_loaded_keys" in str(info.value)  # still says what is wrong
    _assert_hidden(pin, info.value)
    with pytest.raises(StoreConfigError) as info:
        KeyStoreConfig.from_env("bogus")
    _assert_hidden(pin, info.value)


def test_config_with_a_pin_still_opens_the_store(softhsm: SoftHSMToken) -> None:
    config = KeyStoreConfig(store="pkcs11", pkcs11_module=softhsm.module, pkcs11_uri=softhsm.uri)
    assert softhsm.pin not in repr(config)
    with open_key_store(config) as store:
        assert softhsm.pin not in repr(store)
        store.list()


# ---- the TPM transport (issue 7 item 13): allowlist and tpm2-tools' variables -------------

_TCTI_VARS = ("CUSTOS_TCTI", "TPM2TOOLS_TCTI", "TSS2_TCTI")


@pytest.fixture
def no_tcti_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in _TCTI_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    "tcti", ["cmd:touch /tmp/owned", "libtpms:", "/tmp/evil.so", "device\x00:/dev/tpm0", ""]
)
def test_tcti_outside_the_allowlist_is_refused(no_tcti_env: pytest.MonkeyPatch, tcti: str) -> None:
    with pytest.raises(ValidationError):
        KeyStoreConfig(store="tpm", tcti=tcti)
    with pytest.raises(StoreConfigError, match="tcti"):
        KeyStoreConfig.from_env("tpm", tcti=tcti)
    # (the environment cannot hold a NUL, and an empty variable counts as unset)
    no_tcti_env.setenv("TPM2TOOLS_TCTI", tcti if tcti.isprintable() and tcti else "cmd:x")
    with pytest.raises(StoreConfigError, match="TCTI"):
        KeyStoreConfig.from_env("tpm")


def test_tcti_comes_from_custos_then_tpm2_tools_then_tss2(
    no_tcti_env: pytest.MonkeyPatch,
) -> None:
    assert KeyStoreConfig.from_env("tpm").tcti == "device:/dev/tpmrm0"
    no_tcti_env.setenv("TSS2_TCTI", "mssim:port=2321")
    assert KeyStoreConfig.from_env("tpm").tcti == "mssim:port=2321"
    no_tcti_env.setenv("TPM2TOOLS_TCTI", "tabrmd:bus_type=session")
    assert KeyStoreConfig.from_env("tpm").tcti == "tabrmd:bus_type=session"
    no_tcti_env.setenv("CUSTOS_TCTI", "swtpm:port=2321")
    assert KeyStoreConfig.from_env("tpm").tcti == "swtpm:port=2321"
    explicit = KeyStoreConfig.from_env("tpm", tcti="device:/dev/tpm0")
    assert explicit.tcti == "device:/dev/tpm0"


def test_tpm_variables_do_not_concern_other_stores(no_tcti_env: pytest.MonkeyPatch) -> None:
    # A shell set up for some other TPM tool must not break a PKCS#11 or software store.
    no_tcti_env.setenv("TSS2_TCTI", "cmd:whatever")
    assert KeyStoreConfig.from_env("memory").store == "memory"
    assert KeyStoreConfig.from_env("pkcs11").store == "pkcs11"


def test_importing_custos_keys_needs_no_device_library() -> None:
    # A relying party installs custos without the tpm / pkcs11 extras.
    import subprocess
    import sys

    code = (
        "import sys, custos.keys, custos.keys.config, custos.keys.jose, custos.keys.aio\n"
        "bad = sorted(m for m in ('tpm2_pytss', 'pkcs11') if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
