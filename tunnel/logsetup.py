"""Log handler setup for the command line: one stderr handler on the root logger, text or JSON lines.

Only ``tunnel/cli.py`` calls :func:`configure_logging`; library modules just use ``logging.getLogger(__name__)``.

Text: ``2026-11-22T10:00:00Z INFO trio_tunnel.server: message`` (UTC). JSON: one object per line with ``ts`` (UTC, ISO
8601 with milliseconds), ``level``, ``logger``, ``msg``, any fields passed with ``extra={...}``, and ``exc`` when an
exception is attached.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Final, Literal, TextIO

__all__ = ["LogFormat", "JsonFormatter", "TextFormatter", "configure_logging", "level_for"]

LogFormat = Literal["text", "json"]

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRS: Final = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys() | {"message", "asctime", "taskName"}
)


def level_for(verbosity: int) -> int:
    """-v (1 or more) -> DEBUG, 0 -> INFO, -q (-1) -> WARNING, -qq (-2 or less) -> ERROR."""
    if verbosity >= 1:
        return logging.DEBUG
    if verbosity == 0:
        return logging.INFO
    if verbosity == -1:
        return logging.WARNING
    return logging.ERROR


_stamp_cache: list[tuple[int, str]] = [(-1, "")]
"""The last second formatted: a busy tunnel logs a line per connection, many per second."""


def _utc(created: float, *, millis: bool) -> str:
    second = int(created)
    cached, stamp = _stamp_cache[0]
    if cached != second:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _stamp_cache[0] = (second, stamp)
    return f"{stamp}.{int(created % 1 * 1000):03d}Z" if millis else f"{stamp}Z"


class TextFormatter(logging.Formatter):
    """``2026-11-22T10:00:00Z INFO trio_tunnel.server: message``, then the traceback if one is attached."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_utc(record.created, millis=False)} {record.levelname} {record.name}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg``, ``extra`` fields, ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, object] = {
            "ts": _utc(record.created, millis=True),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and key not in obj and not key.startswith("_"):
                obj[key] = value
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            obj["stack"] = self.formatStack(record.stack_info)
        return json.dumps(obj, default=str, ensure_ascii=False)


class _Handler(logging.StreamHandler[TextIO]):
    """Marks the handler this module installed, so a second call replaces it instead of adding another."""


def configure_logging(verbosity: int = 0, fmt: LogFormat = "text", *, stream: TextIO | None = None) -> None:
    """Send log records at the level chosen by ``verbosity`` to stderr (or ``stream``) in ``fmt``.

    Calling it again replaces the previous setup.
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"unknown log format {fmt!r} (expected 'text' or 'json')")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _Handler):
            root.removeHandler(handler)
            handler.close()
    handler = _Handler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level_for(verbosity))
    # What every record would collect and neither format shows: the caller's file and line (a walk up the stack),
    # the thread, and the process id (a system call) and name. A tunnel logs a line per connection, so this is part
    # of what a connection costs (the logging HOWTO's "Optimization" section lists these switches).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.captureWarnings(True)
