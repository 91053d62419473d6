"""Log output: the usual text lines, or one JSON object per line
(`--log-format json`) for log collectors.

A JSON line has `time` (UTC, RFC 3339), `level`, `logger` and `message`, and
where known `saga_id`, `step`, `attempt` and `trace_id` (and `participant`
and `address` on a participant's health lines). Those come from the
saga a task is working on (`bind`, which the engine calls in the task that
drives a saga and in each call's task) or from a log call's `extra=`; an
exception adds `exception` (its traceback).
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
from typing import Any

__all__ = ["CONTEXT_FIELDS", "JsonFormatter", "bind", "configure_logging"]

#: The saga (or participant) fields a line may carry, in the order they are written.
CONTEXT_FIELDS = ("saga_id", "step", "attempt", "trace_id", "participant", "address")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("compensa_log_context", default=None)


# Binding copies a dict per call; until a JsonFormatter exists nothing reads
# the fields, so text logs (the default) skip it.
_wanted = False


def bind(**fields: Any) -> None:
    """Adds saga fields to every line logged from now on in this task (and in
    tasks it creates later), once a JsonFormatter exists; None values are left out."""
    if not _wanted:
        return
    current = _context.get()
    merged = dict(current) if current else {}
    merged.update((key, value) for key, value in fields.items() if value is not None)
    _context.set(merged)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def __init__(self) -> None:
        global _wanted
        super().__init__()
        _wanted = True

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        bound = _context.get() or {}
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is None:
                value = bound.get(name)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        return json.dumps(line, ensure_ascii=False, default=str)


def configure_logging(level: int, log_format: str = "text") -> None:
    """Sets up the root logger to write `log_format` lines (text or json) to stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
