"""``custos server run``: the server in the foreground until SIGTERM or SIGINT.

Logs go to stderr, one line per event: ``time LEVEL logger: message``, or with
``--log-format json`` one JSON object per line (audit events are JSON documents on
the ``custos.audit`` logger either way).  When everything listens, one
line on stdout says so with the addresses, for scripts and supervisors to wait on.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from datetime import UTC, datetime

from custos._signals import stop_requested
from custos.server.app import Server
from custos.server.config import ServerConfig

#: The first words of the line printed when the server is ready.
READY_LINE = "custos server ready"

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonLogFormatter(logging.Formatter):
    """One JSON object per record: ``time``, ``level``, ``logger``, ``msg``, and the
    ``code`` / ``status`` attributes custos loggers attach; ``exc`` with a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in ("code", "status"):
            value = getattr(record, name, None)
            if isinstance(value, str | int):
                out[name] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(level: str = "info", log_format: str = "text") -> None:
    """stderr, one line per record, at *level* (debug | info | warning | error), as
    text (``time LEVEL logger: message``) or JSON (:class:`JsonLogFormatter`)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonLogFormatter() if log_format == "json" else logging.Formatter(_LOG_FORMAT)
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def ready_line(srv: Server) -> str:
    parts = [f"agent_api={srv.agent_api_address}", f"admin_socket={srv.admin_socket}"]
    if srv.http_address is not None:
        parts.append(f"http={srv.http_address}")
    if srv.federation_address is not None:
        parts.append(f"federation={srv.federation_address}")
    return f"{READY_LINE}: " + " ".join(parts)


async def run_server(
    config: ServerConfig, *, on_ready: Callable[[Server], None] | None = None
) -> None:
    """Start, report ready, serve until SIGTERM/SIGINT, stop cleanly."""
    async with stop_requested() as stopping, Server(config) as srv:
        if on_ready is not None:
            on_ready(srv)
        await stopping.wait()
        logging.getLogger(__name__).info("stopping (signal received)")


__all__ = ["READY_LINE", "JsonLogFormatter", "configure_logging", "ready_line", "run_server"]
