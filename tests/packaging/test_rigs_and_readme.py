"""The test rigs do what the README and docs/testing.md say, and the README's
Python runs as written.

- ``softhsm`` is a fresh, empty token for every test; ``softhsm_session`` is one
  token for the whole session;
- the README's Python blocks run unchanged: the library one against a real swtpm
  (with the environment the tour exports), the fixture one as a test file of a
  project that merely has custos installed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from custos.keys.pkcs11 import Pkcs11KeyStore
from custos.testing.softhsm import SoftHSMToken
from custos.testing.swtpm import SwtpmInstance

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("round_", [1, 2])
def test_softhsm_token_is_fresh_for_every_test(softhsm: SoftHSMToken, round_: int) -> None:
    # Both rounds see an empty token: the first one's key did not survive into the second.
    store = Pkcs11KeyStore(softhsm.module, softhsm.uri)
    try:
        assert store.list() == []
        store.create("left-behind", "ES256")
        assert [k.name for k in store.list()] == ["left-behind"]
    finally:
        store.close()


def test_softhsm_session_is_one_token_beside_the_fresh_ones(
    softhsm: SoftHSMToken, softhsm_session: SoftHSMToken
) -> None:
    assert softhsm.token_label != softhsm_session.token_label
    # Same private config: one SOFTHSM2_CONF per process sees both.
    assert softhsm.conf == softhsm_session.conf
    assert os.environ["SOFTHSM2_CONF"] == str(softhsm.conf)
    assert softhsm_session.env == {"SOFTHSM2_CONF": str(softhsm.conf)}


def test_readme_has_the_python_blocks_this_file_runs() -> None:
    blocks = python_blocks()
    assert len(blocks) == 2, "update this test together with the README"
    assert "open_key_store" in blocks[0]
    assert "def test_my_service(swtpm, softhsm)" in blocks[1]


def test_readme_library_snippet_runs_against_swtpm(swtpm: SwtpmInstance, tmp_path: Path) -> None:
    env = dict(os.environ, CUSTOS_TCTI=swtpm.tcti, CUSTOS_KEY_DIR=str(tmp_path / "keys"))
    done = subprocess.run(
        [sys.executable, "-c", python_blocks()[0]],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    token, refusal = done.stdout.strip().splitlines()[-2:]
    assert token.count(".") == 2
    assert refusal == "refused: export_refused"


def test_readme_fixture_snippet_runs_as_a_users_test(tmp_path: Path) -> None:
    # A project with custos installed gets the fixtures from the pytest11 entry point.
    test_file = tmp_path / "test_readme_fixture.py"
    test_file.write_text(python_blocks()[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0",
         "--rootdir", str(tmp_path), str(test_file)],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "1 passed" in done.stdout
