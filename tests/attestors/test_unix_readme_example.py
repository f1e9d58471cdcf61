"""attestors/README.md documents the worked example the tests load: the one in
examples/custos-example-attestor, installed (editable) as its own distribution."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import custos_example_attestor

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "attestors" / "README.md"
EXAMPLE = ROOT / "examples" / "custos-example-attestor"


def _blocks(language: str) -> list[str]:
    """The README's fenced blocks of one language, indentation of the list removed."""
    found = re.findall(rf"^( *)```{language}\n(.*?)^\1```", README.read_text(), re.M | re.S)
    return [
        "".join(line.removeprefix(indent) for line in body.splitlines(True))
        for indent, body in found
    ]


def test_the_loaded_example_is_the_one_in_examples() -> None:
    dist = importlib.metadata.distribution("custos-example-attestor")
    [entry_point] = [ep for ep in dist.entry_points if ep.group == "custos.workload_attestors"]
    assert (entry_point.name, entry_point.value) == (
        "example",
        "custos_example_attestor:ProcessNameAttestor",
    )
    module = Path(custos_example_attestor.__file__ or "").resolve()
    assert module == EXAMPLE / "custos_example_attestor" / "__init__.py"


def test_the_readme_shows_the_examples_class_verbatim() -> None:
    [block] = _blocks("python")
    source = (EXAMPLE / "custos_example_attestor" / "__init__.py").read_text()
    assert block.startswith("class ProcessNameAttestor:")
    assert block in source


def test_the_readme_shows_the_examples_entry_point() -> None:
    toml = next(b for b in _blocks("toml") if "custos-example-attestor/pyproject.toml" in b)
    pyproject = (EXAMPLE / "pyproject.toml").read_text()
    for line in toml.splitlines():
        if line and not line.startswith("#"):
            assert line in pyproject.splitlines(), line
