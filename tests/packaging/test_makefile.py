"""The Makefile's venv stamp: `make venv` reinstalls when a pyproject it installs from
changes, and is a no-op otherwise (checked with `make -n`, which runs nothing: the install
recipe is printed or not)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def up_to_date(checkout: Path) -> bool:
    done = subprocess.run(
        ["make", "-n", "-C", str(checkout), ".venv/.installed"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return "pip install -q -e '.[dev]'" not in done.stdout


def test_stamp_follows_every_pyproject_it_installs(tmp_path: Path) -> None:
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    example = tmp_path / "examples" / "some-attestor"
    example.mkdir(parents=True)
    (example / "pyproject.toml").write_text("[project]\nname = 'y'\n")
    stamp = tmp_path / ".venv" / ".installed"
    stamp.parent.mkdir()
    assert not up_to_date(tmp_path)  # no stamp yet: install

    stamp.touch()
    os.utime(stamp, (2_000_000_000, 2_000_000_000))  # newer than both pyprojects
    assert up_to_date(tmp_path)

    t = 2_000_000_000
    for changed in (tmp_path / "pyproject.toml", example / "pyproject.toml"):
        t += 100
        os.utime(changed, (t, t))
        assert not up_to_date(tmp_path), changed
        t += 100
        os.utime(stamp, (t, t))
        assert up_to_date(tmp_path)
