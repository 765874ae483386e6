"""Sequential streams of a blob: the fetcher's read-ahead of user reads and locality readahead
each keep a :class:`Streams` per blob, under their own lock, and size its windows."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Stream:
    lo: int  # compressed offset from which a read goes on from it
    hi: int  # compressed end of its last window
    next_pos: int  # blob-order position after its last window
    window: int  # the size of its last window


class Streams:
    """At most ``limit`` streams, least recently used first (dropped first)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._streams: list[Stream] = []

    def windows(self) -> list[int]:
        return [s.window for s in self._streams]

    def follow(self, offset: int, slack: int) -> Stream | None:
        """The stream a read from compressed ``offset`` goes on from (``lo <= offset <= hi +
        slack``), now the most recently used; None for a jump."""
        s = next((s for s in self._streams if s.lo <= offset <= s.hi + slack), None)
        if s is not None:
            self._streams.remove(s)
            self._streams.append(s)
        return s

    def note(self, s: Stream | None, lo: int, hi: int, next_pos: int, window: int) -> None:
        """Record a window of ``s`` (from :meth:`follow`; its end never goes back) or, when
        None, of a new stream."""
        if s is None:
            self._streams = [*self._streams, Stream(lo, hi, next_pos, window)][-self.limit :]
        else:
            s.lo, s.hi, s.next_pos, s.window = lo, max(s.hi, hi), max(s.next_pos, next_pos), window
