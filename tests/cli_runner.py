"""Run the real ``custos`` command in a child process, as an operator would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

#: Never inherited by the child: a test says everything through flags or ``extra_env``.
CUSTOS_VARS = ("CUSTOS_KEY_DIR", "CUSTOS_TCTI", "CUSTOS_PKCS11_MODULE", "CUSTOS_PKCS11_URI")


def run_custos(
    *args: str, extra_env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in CUSTOS_VARS}
    env["PYTHONWARNINGS"] = "ignore"
    env.update(extra_env or {})
    return subprocess.run(
        [sys.executable, "-m", "custos", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=cwd,
        check=False,
    )
