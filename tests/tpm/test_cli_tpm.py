"""``custos tpm info``: human text without Python reprs, JSON, and the TCTI allowlist."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_runner import run_custos
from custos.testing.swtpm import SwtpmInstance

_CLEAR = {"TPM2TOOLS_TCTI": "", "TSS2_TCTI": ""}  # empty counts as unset


def test_text_output_has_no_python_reprs(swtpm: SwtpmInstance) -> None:
    result = run_custos("tpm", "info", "--tcti", swtpm.tcti, extra_env=_CLEAR)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    fields = dict(line.split(": ", 1) for line in lines)
    assert fields["pcr_banks"] == "sha1, sha256"
    assert fields["spec"].startswith("TPM 2.0, level 0, revision ")
    assert fields["platform_certificate_present"] == "yes"
    assert fields["ek_certificate[rsa2048]"].startswith("subject ")
    for line in lines:
        assert not any(mark in line for mark in ("{", "['", "':", "None", "True")), line


def test_json_output(swtpm: SwtpmInstance) -> None:
    result = run_custos("tpm", "info", "--output", "json", "--tcti", swtpm.tcti, extra_env=_CLEAR)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["manufacturer"] == "IBM"
    assert doc["pcr_banks"] == ["sha1", "sha256"]
    assert doc["platform_certificate_present"] is True


def test_tpm2tools_tcti_is_honoured(swtpm: SwtpmInstance) -> None:
    result = run_custos("tpm", "info", "-o", "json", extra_env={"TPM2TOOLS_TCTI": swtpm.tcti})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tcti"] == swtpm.tcti


@pytest.mark.parametrize(
    "tcti", ["cmd:touch {out}", "libtpms:{out}", "/lib/libevil.so", "pcap:device"]
)
def test_other_tctis_are_refused_before_libtss2_sees_them(tcti: str, tmp_path: Path) -> None:
    out = tmp_path / "written-by-the-tcti"
    result = run_custos("tpm", "info", "--tcti", tcti.format(out=out), extra_env=_CLEAR)
    assert not out.exists()  # was: cmd: ran the command, libtpms: wrote its state
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error [key_store_config]: --tcti: ")
    assert "device, swtpm, mssim, tabrmd" in result.stderr


def test_a_refused_environment_tcti_names_its_variable() -> None:
    result = run_custos("tpm", "info", extra_env={"CUSTOS_TCTI": "cmd:id", **_CLEAR})
    assert result.returncode == 1
    assert result.stderr.startswith("error [key_store_config]: CUSTOS_TCTI: ")


def test_short_help() -> None:
    result = run_custos("tpm", "info", "-h")
    assert result.returncode == 0
    assert "--output" in result.stdout and "TPM2TOOLS_TCTI" in result.stdout
