"""Thin command-line entry points; shared here: the error edge, the help format, flags."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from ..errors import NydusError

__all__ = ["run_guarded", "HelpFormatter", "flag", "LOG_LEVELS"]

#: Upstream's log level names, as every CLI accepts them.
LOG_LEVELS = ["trace", "debug", "info", "warn", "error"]


def flag(p: argparse._ActionsContainer, *names: str, help: str) -> None:
    """Add an on/off option (``store_true``)."""
    p.add_argument(*names, action="store_true", help=help)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help lines with the default appended (skipped for flags without a real default)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        h = action.help or ""
        if action.default in (None, False, "", 0, argparse.SUPPRESS) or "default" in h:
            return h
        return super()._get_help_string(action)


def run_guarded(prog: str, fn: Callable[[], int], log: logging.Logger | None = None) -> int:
    """Run a command, turning errors into a one-line message and the family's exit code.

    NydusError → its ``exit_code``; OSError → 1; Ctrl-C → 130. With ``log`` the error is
    also logged (daemons log to a file that outlives the terminal); it is printed to stderr
    only when the log does not already go there, so each fatal error shows once.
    """
    try:
        return fn()
    except (NydusError, OSError) as e:
        configured = bool(logging.getLogger().handlers)  # not yet: logging's last resort
        if log is not None and configured:
            log.error("%s", e)
        if log is None or not configured or not _logs_to_stderr():
            print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code if isinstance(e, NydusError) else 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def _logs_to_stderr() -> bool:
    """True if the root logger writes to this process's stderr (or to a stdout that is the
    same file, e.g. the terminal both go to)."""
    for h in logging.getLogger().handlers:
        if not isinstance(h, logging.StreamHandler) or isinstance(h, logging.FileHandler):
            continue
        stream = getattr(h, "stream", None)
        if stream in (sys.stderr, sys.__stderr__):
            return True
        if stream in (sys.stdout, sys.__stdout__) and _same_file(stream, sys.stderr):
            return True
    return False


def _same_file(a: object, b: object) -> bool:
    try:
        sa = os.fstat(a.fileno())  # type: ignore[attr-defined]
        sb = os.fstat(b.fileno())  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
