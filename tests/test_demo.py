"""`make demo` must keep working: run it end to end in a private state directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_demo(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "custos.demo"],
        env=env, capture_output=True, text=True, timeout=300,
    )


def test_demo_runs_end_to_end_and_shows_every_refusal(tmp_path: Path) -> None:
    env = dict(os.environ, CUSTOS_DEMO_STATE=str(tmp_path / "demo-state"))
    env.pop("SOFTHSM2_CONF", None)  # the demo makes its own token
    # `make demo` is safe to run twice: the second run starts over in the same state directory.
    first = run_demo(env)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    done = run_demo(env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in first.stderr + done.stderr
    out = done.stdout
    assert out.count("[export_refused]") == 2  # TPM and PKCS#11
    assert "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign" in out
    assert "authenticated caller" in out and "spiffe://demo.custos.example/ns/shop/sa/web" in out
    assert "refused: 401 [wpt_replayed]" in out
    assert "refused: 401 [wpt_bad_audience]" in out
    assert "refused: 400 [content_digest_mismatch]" in out
    # the swtpm the demo started is gone again
    pid_file = tmp_path / "demo-state" / "tpm" / "swtpm.pid"
    assert not pid_file.exists() or not Path(f"/proc/{pid_file.read_text().strip()}").exists()
