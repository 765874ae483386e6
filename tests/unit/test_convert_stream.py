"""nydusify's streamed blob upload (converter._StreamedUpload): a layer blob goes to the
registry while the builder writes it; any failure leaves the push to the file, and a session
is never left open. A fake upload session stands in for the registry (the real one is in
tests/integration/test_nydusify.py)."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path
from typing import Any, cast

from nydus.convert.converter import _HashingFile, _StreamedUpload
from nydus.convert.store import RegistryStore
from nydus.errors import BackendError

PIECE = 1000


class FakeUpload:
    def __init__(self, fail_at: int | None = None) -> None:
        self.pieces: list[bytes] = []
        self.aborted = False
        self.fail_at = fail_at
        self.got = threading.Event()

    def write(self, piece: bytes) -> None:
        if self.fail_at is not None and len(self.pieces) == self.fail_at:
            raise BackendError("PATCH: 500")
        self.pieces.append(piece)
        self.got.set()

    def abort(self) -> None:
        self.aborted = True


class FakeStore:
    def __init__(self, upload: FakeUpload) -> None:
        self.upload = upload
        self.started = 0

    def start_upload(self) -> FakeUpload:
        self.started += 1
        return self.upload


def _stream(tmp_path: Path, upload: FakeUpload, whole_max: int = 0) -> tuple[Any, Path]:
    path = tmp_path / "blob"
    path.write_bytes(b"")
    store = cast(RegistryStore, FakeStore(upload))
    return _StreamedUpload(store, str(path), PIECE, whole_max), path


def test_blob_is_sent_while_it_is_written(tmp_path: Path) -> None:
    up = FakeUpload()
    st, path = _stream(tmp_path, up)
    sink = _HashingFile(str(path), stream=st)
    data = bytes(range(256)) * 20  # 5120 bytes: five whole pieces and a tail
    sink.write(data[:2500])
    # two pieces are out before the writer is done (or finish() is called)
    deadline = time.monotonic() + 10
    while len(up.pieces) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [len(p) for p in up.pieces] == [PIECE, PIECE]
    sink.write(data[2500:])
    sink.close()
    assert st.finish() is up
    assert b"".join(up.pieces) == data
    assert sink.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert not up.aborted


def test_small_blob_is_not_streamed(tmp_path: Path) -> None:
    up = FakeUpload()
    st, path = _stream(tmp_path, up, whole_max=10_000)
    sink = _HashingFile(str(path), stream=st)
    sink.write(b"x" * 5000)
    sink.close()
    assert st.finish() is None
    assert up.pieces == [] and not up.aborted


def test_failed_piece_ends_streaming_and_drops_the_session(tmp_path: Path) -> None:
    up = FakeUpload(fail_at=1)
    st, path = _stream(tmp_path, up)
    sink = _HashingFile(str(path), stream=st)
    sink.write(b"y" * 4000)
    sink.close()
    assert st.finish() is None  # the caller pushes the file instead
    assert up.aborted
    assert isinstance(st.error, BackendError)


def test_cancel_stops_the_thread_and_drops_the_session(tmp_path: Path) -> None:
    up = FakeUpload()
    st, path = _stream(tmp_path, up)
    sink = _HashingFile(str(path), stream=st)
    sink.write(b"z" * 1500)
    assert up.got.wait(10)
    st.cancel()
    assert up.aborted
    assert not st._thread.is_alive()
    sink.close()
