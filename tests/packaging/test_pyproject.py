"""What pyproject.toml promises (decision 0025): a relying party's `pip install custos`
needs no device library, `.[dev]` (what `make` installs) pulls every extra, and no
dependency is declared that nothing imports."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS: dict[str, list[str]] = PROJECT["optional-dependencies"]

# distribution name -> the top-level module it provides
MODULE_OF = {
    "cryptography": "cryptography",
    "joserfc": "joserfc",
    "pydantic": "pydantic",
    "click": "click",
    "anyio": "anyio",
    "http-sfv": "http_sfv",
    "httpx": "httpx",
    "requests": "requests",
    "redis": "redis",
    "tpm2-pytss": "tpm2_pytss",
    "python-pkcs11": "pkcs11",
    "structlog": "structlog",
    "prometheus-client": "prometheus_client",
}


def name_of(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert match, requirement
    return match.group(0).lower()


def imported_by_src() -> set[str]:
    names: set[str] = set()
    for path in [*(ROOT / "src").rglob("*.py"), *(ROOT / "attestors").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name.partition(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.partition(".")[0])
    return names


def test_device_libraries_are_extras_not_base_dependencies() -> None:
    base = {name_of(r) for r in PROJECT["dependencies"]}
    assert not base & {"tpm2-pytss", "python-pkcs11", "httpx", "requests", "redis"}
    assert {name_of(r) for r in EXTRAS["tpm"]} == {"tpm2-pytss"}
    assert {name_of(r) for r in EXTRAS["pkcs11"]} == {"python-pkcs11"}
    for extra in ("httpx", "requests", "redis"):
        assert {name_of(r) for r in EXTRAS[extra]} == {extra}


def test_every_extra_the_issue_names_exists_and_dev_pulls_them_all() -> None:
    wanted = {"tpm", "pkcs11", "httpx", "requests", "redis", "server", "agent"}
    assert wanted <= set(EXTRAS)
    pulled: set[str] = set()
    for requirement in EXTRAS["dev"]:
        if name_of(requirement) == "custos":
            pulled |= set(re.findall(r"[a-z0-9]+", requirement.split("[", 1)[1]))
    assert wanted <= pulled


def test_no_declared_runtime_dependency_goes_unused() -> None:
    used = imported_by_src()
    declared = [name_of(r) for r in PROJECT["dependencies"]]
    for extra in ("tpm", "pkcs11", "httpx", "requests", "redis"):
        declared += [name_of(r) for r in EXTRAS[extra]]
    unused = sorted(d for d in declared if MODULE_OF.get(d, d.replace("-", "_")) not in used)
    assert unused == []
