"""The fetch-once table of the read path: one claimant, waiters see its result."""

from __future__ import annotations

import threading

from nydus.singleflight import Flight, FlightTable, Once


def test_waiters_get_the_claimants_value_and_the_claim_is_gone() -> None:
    table: FlightTable[int, bytes] = FlightTable()
    lock = threading.Lock()
    with lock:
        mine = table.claim(7)
    seen: list[bytes | None] = []
    found = threading.Semaphore(0)

    def waiter() -> None:
        with lock:
            f = table.get(7)
        found.release()
        assert f is mine
        f.wait()
        seen.append(f.value)

    threads = [threading.Thread(target=waiter) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in threads:
        assert found.acquire(timeout=5)  # every waiter found the claim before it settles
    assert not mine.settled
    with lock:
        table.release(7, mine)
        mine.value = b"chunk"
        mine.settle()
    for t in threads:
        t.join(5)
    assert seen == [b"chunk"] * 4
    assert 7 not in table and table.get(7) is None


def test_release_leaves_a_newer_claim_alone() -> None:
    table: FlightTable[str, bytes] = FlightTable()
    old = table.claim("k")
    table.release("k", old)
    new = table.claim("k")
    table.release("k", old)  # a late release of the first flight
    assert table.get("k") is new


def test_an_error_is_published_like_a_value() -> None:
    f: Flight[bytes] = Flight()
    f.error = OSError("backend down")
    f.settle()
    f.wait()
    assert f.settled and f.value is None and isinstance(f.error, OSError)


def test_once_makes_the_value_once_for_concurrent_callers() -> None:
    made: list[int] = []
    gate = threading.Event()

    def make() -> object:
        gate.wait(5)
        made.append(1)
        return object()

    once = Once(make)
    assert once.peek() is None  # not made by looking
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(once.get())) for _ in range(8)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(10)
    assert len(made) == 1
    assert len(got) == 8 and all(v is got[0] for v in got)
    assert once.peek() is got[0]
