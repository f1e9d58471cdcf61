"""tpm2-tss stays quiet on stderr unless the user set TSS2_LOG (issue 7, new-user list).

Run in child processes: this test process imported custos.testing.swtpm, which
set TSS2_LOG for itself, and libtss2 reads the variable once per process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from custos.testing.swtpm import SwtpmInstance, free_port_pair

# What libtss2 prints: "WARNING:esys:src/...", "ERROR:tcti:src/...", "info:..." etc.
TSS_LINE = re.compile(r"^(ERROR|WARNING|warning|info|debug|trace):[a-z_]+:", re.MULTILINE)

_VARS = ("TSS2_LOG", "CUSTOS_TCTI", "TPM2TOOLS_TCTI", "TSS2_TCTI")


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    child = {k: v for k, v in os.environ.items() if k not in _VARS}
    child.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
        env=child, check=False,
    )  # fmt: skip


def _info(tcti: str) -> str:
    return (
        "from custos.tpm.info import tpm_info\n"
        "from custos.errors import CustosError\n"
        "try:\n"
        f"    print(tpm_info({tcti!r})['manufacturer'])\n"
        "except CustosError as e:\n"
        "    print('custos error', e.code)\n"
    )


def _store(tcti: str, key_dir: str) -> str:
    return (
        "from custos.keys.tpm import TpmKeyStore\n"
        f"with TpmKeyStore(tcti={tcti!r}, key_dir={key_dir!r}) as s:\n"
        "    s.create('k', 'ES256'); s.sign('k', b'x'); print('signed')\n"
    )


def test_success_prints_nothing_from_the_tss(swtpm: SwtpmInstance, tmp_path: object) -> None:
    # tpm info probes EK indices swtpm does not have (ecc-p256): libtss2 logs those.
    result = _run(_info(swtpm.tcti))
    assert result.stdout.strip() == "IBM", result.stderr
    assert not TSS_LINE.search(result.stderr), result.stderr
    result = _run(_store(swtpm.tcti, str(tmp_path)))
    assert result.stdout.strip() == "signed", result.stderr
    assert not TSS_LINE.search(result.stderr), result.stderr


def test_refused_connection_prints_only_our_error() -> None:
    tcti = f"swtpm:host=127.0.0.1,port={free_port_pair()}"  # nothing listens there
    result = _run(_info(tcti))
    assert result.stdout.strip() == "custos error device_unavailable", result.stderr
    assert not TSS_LINE.search(result.stderr), result.stderr


@pytest.mark.parametrize("level", ["tcti+warning", "all+error"])
def test_a_user_set_tss2_log_is_kept(level: str) -> None:
    tcti = f"swtpm:host=127.0.0.1,port={free_port_pair()}"
    result = _run(_info(tcti) + "import os; print(os.environ['TSS2_LOG'])", TSS2_LOG=level)
    assert result.stdout.split() == ["custos", "error", "device_unavailable", level]
    assert TSS_LINE.search(result.stderr), result.stderr  # the user asked for them
