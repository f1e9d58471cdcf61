"""custos.testing.docker without an engine: the mirror apt uses, the image tag, and that
`down` stops only a dockerd the rig recorded (never a recycled pid)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from custos.testing import docker as rig


def test_the_mirror_is_apt_s_main_source_for_the_suite_not_security(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\n"
        "# http://snapshot.debian.org/archive/debian-security/20250520T000000Z\n"
        "URIs: http://security.example/debian-security\n"
        "Suites: bookworm-security\n"
        "Components: main\n"
        "\n"
        "Types: deb-src\n"
        "URIs: http://src.example/debian\n"
        "Suites: bookworm\n"
        "Components: main\n"
        "\n"
        "Types: deb\n"
        "URIs: http://disabled.example/debian\n"
        "Suites: bookworm\n"
        "Components: main\n"
        "Enabled: no\n"
        "\n"
        "Types: deb\n"
        "URIs: http://mirror.example/debian\n"
        "Suites: bookworm bookworm-updates\n"
        "Components: main contrib\n"
    )
    assert rig.debian_mirror(apt_dir=tmp_path) == "http://mirror.example/debian"
    assert rig.image_tag("http://mirror.example/debian") != rig.image_tag("http://other/debian")
    assert rig.image_tag("http://a/") == rig.image_tag("http://a/")  # stable: reused


def test_a_one_line_sources_list_is_read_too(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text(
        "# comment\n"
        "deb-src http://src.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://line.example/debian bookworm main\n"
    )
    assert rig.debian_mirror(apt_dir=tmp_path) == "http://line.example/debian"
    with pytest.raises(rig.DockerRigError, match="no source for trixie main"):
        rig.debian_mirror("trixie", apt_dir=tmp_path)


def test_down_stops_only_a_recorded_dockerd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record whose pid is not (or no longer) a dockerd is dropped, its process untouched."""
    monkeypatch.setenv(rig.STATE_DIR_ENV, str(tmp_path))
    assert rig.stop_engine() is False  # no record: nothing of ours
    other = subprocess.Popen(["sleep", "60"])
    try:
        rig.EngineRecord(other.pid, str(tmp_path / "log")).save()
        assert rig.stop_engine() is False
        assert other.poll() is None  # still running
        assert rig.EngineRecord.load() is None  # the stale record is gone
    finally:
        other.kill()
        other.wait()
