"""custos logs through the standard library's :mod:`logging` (decision 0025).

A library must not pick its users' logging: stdlib loggers stay silent until the
application configures them (only WARNING and above reach stderr through
``logging.lastResort``), and structlog users route them through
``structlog.stdlib.ProcessorFormatter``. :func:`get_logger` keeps the event style
the integrations use, ``log.info("wimse_request_refused", code=..., status=...)``:
the keywords become attributes of the record (``record.event``, ``record.code``...)
and are appended to the message as ``key=value`` for plain handlers.

Never pass a token, a proof or a signature value as a field (draft-ietf-wimse-wpt-02:
implementations must not log raw WPTs).
"""

from __future__ import annotations

import logging
from typing import Any

# The keywords Logger.log() itself takes; everything else is a structured field.
_LOGGING_KEYWORDS = frozenset({"exc_info", "stack_info", "stacklevel", "extra"})
# Attributes a LogRecord already has: a field of that name is stored as "field_<name>"
# because logging refuses to overwrite them (KeyError at emit time).
_RECORD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class EventLogger(logging.LoggerAdapter[logging.Logger]):
    """A stdlib logger that takes structured fields as keyword arguments."""

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if not self.logger.isEnabledFor(level):
            return
        fields = {k: kwargs.pop(k) for k in list(kwargs) if k not in _LOGGING_KEYWORDS}
        extra: dict[str, Any] = dict(kwargs.get("extra") or {})
        extra["event"] = msg
        for key, value in fields.items():
            extra[f"field_{key}" if key in _RECORD_ATTRIBUTES else key] = value
        kwargs["extra"] = extra
        if fields:
            suffix = " ".join(f"{k}={v}" for k, v in fields.items())
            # With %-style args the message is formatted: keep a field's "%" literal.
            msg = f"{msg} " + (suffix.replace("%", "%%") if args else suffix)
        # One frame more than the stdlib adapter: the record names our caller, not us.
        kwargs["stacklevel"] = kwargs.get("stacklevel", 1) + 1
        self.logger.log(level, msg, *args, **kwargs)


def get_logger(name: str) -> EventLogger:
    """The logger ``name`` (``custos.<package>``), taking ``key=value`` fields."""
    return EventLogger(logging.getLogger(name))
