"""Shared pieces of the atheris fuzz targets in ``fuzz/``: a SIGALRM time limit, the replay
contract and the command-line entry point.

Each target module (``fuzz_tar.py``, ``fuzz_blobmeta.py``, ``fuzz_oci.py``, ``fuzz_config.py``)
defines ``check(data)`` that feeds the bytes to a parser and checks its promises; the contract
is the same everywhere: a malformed input raises a :class:`nydus.errors.NydusError` (with a
message) and nothing else, within a time limit. Any other exception is a crash.

This module imports nothing from ``nydus`` so that a target can import it before atheris
instruments the project's modules. Single-threaded (``time_limit`` uses signals).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

REPLAY_SECONDS = 2.0
SRC = Path(__file__).resolve().parents[1] / "src"


def add_src_to_path() -> None:
    """Run from a checkout without an install: ``<repo>/src`` first on ``sys.path``."""
    if SRC.is_dir() and str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))


class FuzzTimeout(BaseException):
    """SIGALRM fired: a hang or unbounded work. A BaseException so that product code catching
    ``Exception`` cannot hide it."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise FuzzTimeout after ``seconds`` (main thread only); an outer ITIMER_REAL (e.g.
    pytest-timeout's) is suspended and re-armed with what was left."""

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise FuzzTimeout(f"no result after {seconds} s: a hang or unbounded work")

    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay:
            left = max(old_delay - (time.monotonic() - start), 0.001)
            signal.setitimer(signal.ITIMER_REAL, left, old_interval)


def replay(
    check: Callable[[bytes], object],
    data: bytes,
    allowed: type[BaseException],
    seconds: float = REPLAY_SECONDS,
) -> BaseException | None:
    """The fuzz contract without libFuzzer: None if ``check(data)`` passes, else the
    ``allowed`` exception (which must have a message). Anything else propagates, including
    FuzzTimeout after ``seconds``."""
    with time_limit(seconds):
        try:
            check(data)
        except allowed as e:
            assert str(e).strip(), f"{type(e).__name__} without a message"
            return e
    return None


def fuzz_main(check: Callable[[bytes], object], allowed: type[BaseException]) -> None:
    """atheris.Setup + Fuzz with ``check``; ``allowed`` exceptions are the documented way to
    reject an input."""
    import logging

    import atheris

    logging.disable(logging.CRITICAL)  # warnings on stderr for every input cost most of the time

    def test_one_input(data: bytes) -> None:
        with contextlib.suppress(allowed):
            check(data)

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
