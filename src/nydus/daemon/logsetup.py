"""Logging for every tool (nydusd, nydus-image, nydusify, the snapshotter): upstream-like
lines to stderr or ``--log-file`` (optionally rotated).

``[2024-05-06 08:09:16.853513 +00:00] INFO [nydus.daemon] message``. Levels are upstream's
(trace, debug, info, warn, error); trace maps to Python level 5.

The log file is mode 0600 (it may name images and hosts; credentials are redacted by a filter
on the handler, whatever the level). Threading contract: call :func:`setup_logging` once from
the main thread before other threads.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
from typing import TextIO

from ..credentials import PrivateFileHandler, PrivateRotatingFileHandler, RedactingFilter

__all__ = ["setup_logging", "LEVELS", "TRACE", "UpstreamFormatter"]

TRACE = 5
LEVELS = {
    "trace": TRACE,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class UpstreamFormatter(logging.Formatter):
    """``[time] LEVEL [module] message``, as upstream's Rust tools log."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        t = dt.datetime.fromtimestamp(record.created, dt.UTC)
        return t.strftime("%Y-%m-%d %H:%M:%S.%f +00:00")

    def format(self, record: logging.LogRecord) -> str:
        level = {"WARNING": "WARN", "Level 5": "TRACE"}.get(record.levelname, record.levelname)
        text = f"[{self.formatTime(record)}] {level} [{record.name}] {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup_logging(
    level: str = "info",
    log_file: str | None = None,
    rotation_size_mb: int = 0,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Configure the root logger (``log_file``, else ``stream``, else stderr); returns the
    installed handler."""
    logging.addLevelName(TRACE, "TRACE")
    lv = LEVELS.get(level.lower())
    if lv is None:
        raise ValueError(f"unknown log level {level!r} (trace, debug, info, warn, error)")
    handler: logging.Handler
    if log_file:
        if rotation_size_mb > 0:
            handler = PrivateRotatingFileHandler(
                log_file, maxBytes=rotation_size_mb << 20, backupCount=5
            )
        else:
            handler = PrivateFileHandler(log_file)
    else:
        handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(UpstreamFormatter())
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(lv)
    return handler
