"""Thin command-line entry points; the one shared piece is the error edge below."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from ..errors import NydusError

__all__ = ["run_guarded"]


def run_guarded(prog: str, fn: Callable[[], int], log: logging.Logger | None = None) -> int:
    """Run a command, turning errors into a one-line message and the family's exit code.

    NydusError → its ``exit_code``; OSError → 1; Ctrl-C → 130. With ``log`` the error is
    also logged (daemons log to a file that outlives the terminal).
    """
    try:
        return fn()
    except (NydusError, OSError) as e:
        if log is not None:
            log.error("%s", e)
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code if isinstance(e, NydusError) else 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
