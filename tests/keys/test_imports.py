"""The custos.keys modules import cleanly on their own and without a cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import custos.keys

KEYS_DIR = Path(custos.keys.__file__).parent
MODULES = sorted(f"custos.keys.{p.stem}" for p in KEYS_DIR.glob("*.py") if p.stem != "__init__")


def _is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and (
        (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
        or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")
    )


def _runtime_keys_imports(module: str) -> set[str]:
    """Every custos.keys module *module* imports at run time (top level or in a
    function body), leaving out imports under ``if TYPE_CHECKING:``."""
    tree = ast.parse((KEYS_DIR / f"{module.rsplit('.', 1)[1]}.py").read_text())
    found: set[str] = set()

    def walk(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking_block(child):
                continue
            if isinstance(child, ast.ImportFrom) and child.module:
                if child.module.startswith("custos.keys."):
                    found.add(child.module)
                elif child.module == "custos.keys":
                    found.update(f"custos.keys.{a.name}" for a in child.names)
            elif isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.startswith("custos.keys."))
            walk(child)

    walk(tree)
    return found & set(MODULES)


def test_no_import_cycle_among_keys_modules() -> None:
    # A cycle hidden by a function-level import still is one: the graph of run-time
    # imports (TYPE_CHECKING ones left out) must be acyclic.
    graph = {m: _runtime_keys_imports(m) for m in MODULES}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == 1:
            pytest.fail("import cycle: " + " -> ".join([*path[path.index(m) :], m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for dep in sorted(graph[m]):
            visit(dep, [*path, m])
        state[m] = 2

    for m in MODULES:
        visit(m, [])


@pytest.mark.parametrize("module", MODULES)
def test_each_keys_module_imports_alone_in_a_fresh_process(module: str) -> None:
    r = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
