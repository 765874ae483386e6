"""The stream tracker (storage/streams.py) the fetcher's read-ahead and locality readahead
share: which read goes on from a recent window, and which streams are remembered."""

from __future__ import annotations

from nydus.storage.streams import Stream, Streams

K = 1 << 10


def test_a_read_within_a_window_or_its_slack_goes_on_from_it() -> None:
    s = Streams(4)
    s.note(None, 64 * K, 128 * K, 3, 128 * K)
    st = s.follow(64 * K, 0)
    assert st == Stream(64 * K, 128 * K, 3, 128 * K)
    assert s.follow(128 * K, 0) is st  # right at its end
    assert s.follow(64 * K - 1, 0) is None  # before it
    assert s.follow(128 * K + 1, 0) is None  # past it: a jump
    assert s.follow(200 * K, 72 * K) is st  # within the slack
    assert s.follow(200 * K + 1, 72 * K) is None


def test_going_on_moves_the_window_forward_never_back() -> None:
    s = Streams(4)
    s.note(None, 0, 128 * K, 3, 128 * K)
    st = s.follow(0, 0)
    s.note(st, 64 * K, 96 * K, 2, 256 * K)  # a window ending before the last one's end
    assert st == Stream(64 * K, 128 * K, 3, 256 * K)
    s.note(st, 128 * K, 512 * K, 9, 512 * K)
    assert st == Stream(128 * K, 512 * K, 9, 512 * K)
    assert s.follow(64 * K, 0) is None  # before its latest read: not this stream
    assert s.windows() == [512 * K]


def test_the_least_recently_used_stream_is_dropped() -> None:
    s = Streams(2)
    s.note(None, 0, 10, 1, 1)
    s.note(None, 100, 110, 5, 2)
    assert s.windows() == [1, 2]
    assert s.follow(5, 0) is not None  # the first is now the most recently used
    assert s.windows() == [2, 1]
    s.note(None, 200, 210, 9, 3)  # a third: the second goes
    assert s.windows() == [1, 3]
    assert s.follow(105, 0) is None
    assert s.follow(205, 0) is not None


def test_of_two_matching_streams_the_least_recently_used_goes_on() -> None:
    s = Streams(4)
    s.note(None, 0, 100, 1, 1)
    s.note(None, 50, 150, 2, 2)
    st = s.follow(60, 0)
    assert st is not None and st.window == 1
    assert s.windows() == [2, 1]


def test_one_stream() -> None:
    s = Streams(1)
    s.note(None, 0, 10, 1, 1)
    s.note(None, 100, 110, 5, 2)
    assert s.windows() == [2]
