"""Install a tiny distribution (``.dist-info`` + modules) into a directory on sys.path."""

from __future__ import annotations

from pathlib import Path


def install_dist(root: Path, dist: str, entry_points: str, modules: dict[str, str]) -> None:
    info = root / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(entry_points)
    for name, source in modules.items():
        (root / f"{name}.py").write_text(source)
