"""One logging library across the tree: the standard library's (decision 0025)."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest

from custos._logging import get_logger

SRC = Path(__file__).resolve().parents[2] / "src" / "custos"


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.partition(".")[0])
    return names


def test_no_module_logs_through_another_library() -> None:
    offenders = sorted(
        str(path.relative_to(SRC))
        for path in SRC.rglob("*.py")
        if {"structlog", "loguru"} & imported_modules(path)
    )
    assert offenders == []


def test_event_fields_reach_stdlib_records(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="custos.test")
    log = get_logger("custos.test")
    log.info("wimse_request_refused", code="wpt_replayed", status=401, name="clash")
    log.warning("PIN file %s is readable", "/p", mode="50%")
    first, second = caplog.records
    assert first.name == "custos.test"
    assert first.event == "wimse_request_refused"  # type: ignore[attr-defined]
    assert (first.code, first.status) == ("wpt_replayed", 401)  # type: ignore[attr-defined]
    # "name" is a LogRecord attribute: the field is kept beside it, the logger name stays.
    assert first.field_name == "clash"  # type: ignore[attr-defined]
    assert first.getMessage() == "wimse_request_refused code=wpt_replayed status=401 name=clash"
    assert second.getMessage() == "PIN file /p is readable mode=50%"
    # The record points at the caller, not at the adapter.
    assert first.filename == Path(__file__).name


def test_quiet_until_configured(capfd: pytest.CaptureFixture[str]) -> None:
    # Like any library logger: INFO goes nowhere unless the application configures logging.
    logger = logging.getLogger("custos.quiet-test")
    logger.propagate = False
    try:
        get_logger("custos.quiet-test").info("event_nobody_asked_for", code="x")
    finally:
        logger.propagate = True
    out, err = capfd.readouterr()
    assert "event_nobody_asked_for" not in out + err
