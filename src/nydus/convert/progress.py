"""Progress of long operations (``nydusify convert``, ``nydus-image create``), drawn with tqdm.

On a terminal every unit of work in flight (a layer, or the one image ``create`` builds) gets
a tqdm bar: bytes read of its source against the total, and after the bar the chunks made,
how many of them were deduplicated, and the blob bytes written or pushed. A finished unit
leaves one permanent line (bytes read, chunks, chunks deduplicated, its blob and whether it
was pushed or already there). Off a terminal nothing is printed while working (logs and pipes
stay clean); the callers print their summary at the end either way.

Thread-safe: workers of several layers (and each layer's blob writer) report through one
lock; tqdm serialises the terminal writes.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from typing import Any, TextIO

from tqdm import tqdm

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
    written: int = 0  # bytes of Nydus blob written (or pushed) so far
    chunks: int = 0
    deduped: int = 0
    state: str = "converting"  # converting, pushing
    done: bool = False


class Progress:
    """Per-unit bars on ``stream`` when it is a terminal (or ``enabled`` says so)."""

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = _isatty(self.stream) if enabled is None else enabled
        self._lock = threading.Lock()
        self._layers: list[LayerProgress] = []
        self._bars: dict[int, tqdm[Any]] = {}
        self._positions: dict[int, int] = {}

    def layer(self, label: str, total: int) -> LayerProgress:
        lp = LayerProgress(label, total)
        with self._lock:
            self._layers.append(lp)
        return lp

    def advance(self, lp: LayerProgress, n: int = 0, written: int = 0) -> None:
        with self._lock:
            lp.read += n
            lp.written += written
            self._update(lp, n)

    def chunk(self, lp: LayerProgress, deduplicated: bool, read: int = 0) -> None:
        """One chunk placed (``read``: source bytes it accounts for, if the caller counts
        input by chunks)."""
        with self._lock:
            lp.chunks += 1
            lp.deduped += deduplicated
            lp.read += read
            self._update(lp, read)

    def set_state(self, lp: LayerProgress, state: str) -> None:
        with self._lock:
            lp.state = state
            self._update(lp, 0, force=True)

    def message(self, text: str) -> None:
        """A permanent line (terminal only)."""
        if not self.enabled:
            return
        with self._lock:
            tqdm.write(text, file=self.stream)

    def finish_layer(self, lp: LayerProgress, text: str) -> None:
        with self._lock:
            lp.done = True
            bar = self._bars.pop(id(lp), None)
            self._positions.pop(id(lp), None)
            if bar is not None:
                bar.close()
            if self.enabled:
                tqdm.write(text, file=self.stream)

    def close(self) -> None:
        with self._lock:
            for bar in self._bars.values():
                bar.close()
            self._bars.clear()
            self._positions.clear()

    # -- drawing (under the lock) --------------------------------------------------------------

    def _update(self, lp: LayerProgress, n: int, force: bool = False) -> None:
        if not self.enabled or lp.done:
            return
        bar: tqdm[Any] | None = self._bars.get(id(lp))
        if bar is None:
            if not (lp.read or lp.written or force):
                return  # not started: no bar yet (queued layers stay off the screen)
            used = set(self._positions.values())
            pos = next(i for i in range(len(used) + 1) if i not in used)
            bar = tqdm(
                total=lp.total or None,
                desc=lp.label,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=self.stream,
                position=pos,
                leave=False,
                dynamic_ncols=True,
                mininterval=0.1,
                initial=lp.read,
                postfix=self._postfix(lp),
            )
            self._bars[id(lp)] = bar
            self._positions[id(lp)] = pos
            return
        bar.set_postfix_str(self._postfix(lp), refresh=False)
        bar.update(n)
        if force:
            bar.refresh()

    @staticmethod
    def _postfix(lp: LayerProgress) -> str:
        if lp.state == "pushing":
            return f"{lp.chunks} chunks, {lp.deduped} dedup, pushing {human(lp.written)}"
        return f"{lp.chunks} chunks, {lp.deduped} dedup, blob {human(lp.written)}"


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
