"""The TCTI allowlist and where a TCTI comes from (issue 7 item 13, CLI conventions)."""

from __future__ import annotations

import pytest

from custos.keys.errors import StoreConfigError
from custos.tpm.tcti import (
    ALLOWED_TCTIS,
    DEFAULT_TCTI,
    MAX_TCTI_LENGTH,
    resolve_tcti,
    validate_tcti,
)


@pytest.mark.parametrize(
    "value",
    [
        "device",
        "device:/dev/tpmrm0",
        "device:/dev/tpm0",
        "swtpm",
        "swtpm:port=2321",
        "swtpm:host=127.0.0.1,port=2321",
        "mssim:host=localhost,port=2321",
        "tabrmd",
        "tabrmd:bus_name=com.intel.tss2.Tabrmd,bus_type=session",
    ],
)
def test_allowed_tctis_pass_unchanged(value: str) -> None:
    assert validate_tcti(value) == value


@pytest.mark.parametrize(
    "value",
    [
        "cmd:tpm2_startup -c",
        "cmd",
        "libtpms:/tmp/state",
        "libtpms",
        "spi-ltt2go",
        "pcap:device:/dev/tpmrm0",
        "/usr/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0",
        "libtss2-tcti-device.so.0:/dev/tpmrm0",
        "Device:/dev/tpmrm0",
        " device",
        "",
        ":/dev/tpmrm0",
    ],
)
def test_other_tctis_are_refused_naming_the_allowed_set(value: str) -> None:
    with pytest.raises(StoreConfigError) as info:
        validate_tcti(value)
    for name in ALLOWED_TCTIS:
        assert name in str(info.value)
    assert info.value.code == "key_store_config"


@pytest.mark.parametrize(
    "value", ["device:/dev/tpmrm0\0", "swtpm:port=2321\n", "device:\x1b[2J", "swtpm:\x7f"]
)
def test_control_characters_are_refused_without_echoing_them(value: str) -> None:
    with pytest.raises(StoreConfigError, match="control characters") as info:
        validate_tcti(value)
    assert value not in str(info.value)


def test_overlong_tcti_is_refused() -> None:
    validate_tcti("swtpm:host=" + "a" * (MAX_TCTI_LENGTH - len("swtpm:host=")))
    with pytest.raises(StoreConfigError, match="longer than"):
        validate_tcti("swtpm:host=" + "a" * MAX_TCTI_LENGTH)


def test_non_string_is_refused() -> None:
    with pytest.raises(StoreConfigError, match="string"):
        validate_tcti(b"device")  # type: ignore[arg-type]


def test_error_names_its_source() -> None:
    with pytest.raises(StoreConfigError, match=r"^TSS2_TCTI: "):
        resolve_tcti(None, {"TSS2_TCTI": "cmd:id"})
    with pytest.raises(StoreConfigError, match=r"^tcti: "):
        resolve_tcti("cmd:id", {})


def test_resolution_order() -> None:
    env = {
        "CUSTOS_TCTI": "swtpm:port=1",
        "TPM2TOOLS_TCTI": "swtpm:port=2",
        "TSS2_TCTI": "swtpm:port=3",
    }
    assert resolve_tcti("mssim:port=0", env) == "mssim:port=0"
    assert resolve_tcti(None, env) == "swtpm:port=1"
    del env["CUSTOS_TCTI"]
    assert resolve_tcti(None, env) == "swtpm:port=2"
    env["TPM2TOOLS_TCTI"] = ""  # set but empty counts as unset, as in tpm2-tools
    assert resolve_tcti(None, env) == "swtpm:port=3"
    assert resolve_tcti(None, {}) == DEFAULT_TCTI == "device:/dev/tpmrm0"


def test_explicit_empty_is_refused_not_defaulted() -> None:
    with pytest.raises(StoreConfigError):
        resolve_tcti("", {"CUSTOS_TCTI": "swtpm"})


def test_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("CUSTOS_TCTI", "TPM2TOOLS_TCTI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TSS2_TCTI", "tabrmd")
    assert resolve_tcti(None) == "tabrmd"
    monkeypatch.setenv("TPM2TOOLS_TCTI", "libtpms:/tmp/x")
    with pytest.raises(StoreConfigError, match="TPM2TOOLS_TCTI"):
        resolve_tcti(None)
