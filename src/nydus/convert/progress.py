"""Progress and summary output of nydusify.

On a terminal, one status line is redrawn at most ten times a second (layers done; for the
layers in flight the source bytes read, the Nydus blob bytes written, or the push) and each
finished layer gets a permanent line: bytes read, chunks,
chunks deduplicated, the blob and whether it was pushed or already there. Off a terminal
nothing is printed while working. :func:`format_summary` renders the end-of-run summary.

Thread-safe: workers report through one lock.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import TextIO

__all__ = ["Progress", "LayerProgress", "human"]


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@dataclass
class LayerProgress:
    label: str
    total: int
    read: int = 0
    written: int = 0  # bytes of Nydus blob written so far
    state: str = "converting"  # converting, pushing
    done: bool = False


class Progress:
    """Per-layer progress on ``stream`` when it is a terminal (or ``enabled`` says so)."""

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._lock = threading.Lock()
        self._layers: list[LayerProgress] = []
        self._last = 0.0
        self._status = False

    def layer(self, label: str, total: int) -> LayerProgress:
        lp = LayerProgress(label, total)
        with self._lock:
            self._layers.append(lp)
        return lp

    def advance(self, lp: LayerProgress, n: int = 0, written: int = 0) -> None:
        lp.read += n
        lp.written += written
        self._tick()

    def set_state(self, lp: LayerProgress, state: str) -> None:
        lp.state = state
        self._tick(force=True)

    def _tick(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        with self._lock:
            self._last = now
            self._redraw()

    def _redraw(self) -> None:
        active = [lp for lp in self._layers if not lp.done and lp.read]
        done = sum(1 for lp in self._layers if lp.done)
        parts = [f"layers {done}/{len(self._layers)} done"]
        for lp in active[:3]:
            if lp.state == "pushing":
                parts.append(f"{lp.label} pushing {human(lp.written)}")
                continue
            pct = 100 * lp.read / lp.total if lp.total else 100
            parts.append(f"{lp.label} {human(lp.read)}/{human(lp.total)} ({pct:.0f}%) "
                         f"-> {human(lp.written)}")
        line = " | ".join(parts)
        width = 150
        self.stream.write("\r\x1b[K" + line[:width])
        self.stream.flush()
        self._status = True

    def message(self, text: str) -> None:
        """A permanent line (terminal only)."""
        if not self.enabled:
            return
        with self._lock:
            if self._status:
                self.stream.write("\r\x1b[K")
            self.stream.write(text + "\n")
            self._status = False
            self._redraw()

    def finish_layer(self, lp: LayerProgress, text: str) -> None:
        lp.done = True
        self.message(text)

    def close(self) -> None:
        if self.enabled and self._status:
            with self._lock:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
                self._status = False
