"""Hostile arguments to ``custos tpm quote | certify``: each refused with a usage error
(exit 2, the option named) or a plain error (exit 1), never a traceback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cli_runner import run_custos
from custos.testing.swtpm import SwtpmInstance

_CLEAR = {"TPM2TOOLS_TCTI": "", "TSS2_TCTI": ""}
NONCE = "00112233445566778899aabbccddeeff"


@pytest.mark.parametrize(
    "pcrs",
    [
        "",
        "sha256",
        "sha256:",
        "sha256:24",
        "sha256:99",
        "sha256:-1",
        "sha256:0,,1",
        "sha256:0-7",
        "sha256:all",
        "md5:0",
        "sha256:0+sha256:1",
        "sha256:0+",
        "sha256:" + ",".join(["0"] * 5000),
        "sha256:\u0661",
    ],
)
def test_quote_refuses_bad_pcr_selections(pcrs: str, tmp_path: Path) -> None:
    result = run_custos("tpm", "quote", "--tcti", "swtpm:port=1", "--nonce", NONCE,
                        "--pcrs", pcrs, "--out", str(tmp_path / "q"),
                        extra_env=_CLEAR)  # fmt: skip
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "--pcrs" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("nonce", ["0x0011", "00 11", "0g", "001", "\u0661\u0662"])
def test_quote_refuses_odd_nonces(nonce: str, tmp_path: Path) -> None:
    result = run_custos("tpm", "quote", "--tcti", "swtpm:port=1", "--nonce", nonce,
                        "--out", str(tmp_path / "q"), extra_env=_CLEAR)  # fmt: skip
    assert result.returncode == 2 and "--nonce" in result.stderr, result.stderr[-2000:]


def test_quote_out_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    result = run_custos("tpm", "quote", "--tcti", "swtpm:port=1", "--nonce", NONCE,
                        "--out", str(target), extra_env=_CLEAR)  # fmt: skip
    assert result.returncode == 2 and "--out" in result.stderr, result.stderr[-2000:]


def _unwritable(tmp_path: Path) -> list[Path]:
    """Directories --out cannot be: under a regular file; read-only (unless root)."""
    (tmp_path / "file").write_text("x")
    out = [tmp_path / "file" / "sub"]
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        out += [locked, locked / "sub"]
    return out


@pytest.mark.parametrize("verb", ["quote", "certify"])
def test_out_not_writable_is_refused_before_the_tpm_is_used(
    verb: str, swtpm: SwtpmInstance, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    args = ["--key", "k"] if verb == "certify" else ["--nonce", NONCE]
    try:
        for out in _unwritable(tmp_path):
            result = run_custos("tpm", verb, "--tcti", swtpm.tcti, *args,
                                "--key-dir", str(keys), "--out", str(out),
                                extra_env=_CLEAR)  # fmt: skip
            assert result.returncode == 2, result.stderr[-3000:]
            assert "Traceback" not in result.stderr and "--out" in result.stderr, result.stderr
        # Refused before the TPM was used: no AK was created for it.
        assert not (keys / "attestation-key.pem").exists()
    finally:
        if (tmp_path / "locked").exists():
            (tmp_path / "locked").chmod(0o700)


@pytest.mark.parametrize("verb", ["quote", "certify"])
def test_an_ak_or_key_dir_path_that_cannot_be_used_is_a_plain_error(
    verb: str, swtpm: SwtpmInstance, tmp_path: Path
) -> None:
    plain = tmp_path / "plain"
    plain.write_text("x")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # would block a plain open()
    args = ["--key", "k"] if verb == "certify" else ["--nonce", NONCE]
    for extra in (["--ak", str(plain / "ak.pem")], ["--key-dir", str(plain)],
                  ["--ak", str(plain)], ["--ak", str(fifo)], ["--ak", "/dev/zero"]):  # fmt: skip
        result = run_custos("tpm", verb, "--tcti", swtpm.tcti, *args, *extra,
                            "--out", str(tmp_path / "out"), extra_env=_CLEAR)  # fmt: skip
        assert result.returncode in (1, 2), result.stderr[-2000:]
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
