"""pissa.core.hashing: file sha256s, in the caller's thread or in the background, and their cancellation."""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import CancelledError
from pathlib import Path

import pytest

from pissa.core.hashing import BackgroundDigests, sha256_file


def _files(tmp_path: Path) -> list[Path]:
    paths = []
    for i, size in enumerate([0, 1000, 3 << 20]):
        p = tmp_path / f"f{i}"
        p.write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
        paths.append(p)
    return paths


def test_background_digests_equal_hashlib(tmp_path: Path) -> None:
    paths = _files(tmp_path)
    digests = BackgroundDigests(paths, chunk=1 << 16)
    for p in paths:
        assert digests.get(p).result(timeout=30) == hashlib.sha256(p.read_bytes()).hexdigest() == sha256_file(p)
    assert digests.get(tmp_path / "other") is None


def test_stop_interrupts_hashing(tmp_path: Path) -> None:
    big = _files(tmp_path)[2]
    stop = threading.Event()
    stop.set()
    with pytest.raises(InterruptedError):
        sha256_file(big, chunk=1 << 16, stop=stop)


def test_cancel_stops_the_files_not_yet_hashed(tmp_path: Path) -> None:
    paths = []
    for i in range(20):  # 60 MB: far more than the thread hashes before cancel() below
        p = tmp_path / f"big{i}"
        p.write_bytes(b"z" * (3 << 20))
        paths.append(p)
    digests = BackgroundDigests(paths, chunk=1 << 10)
    digests.cancel()
    with pytest.raises((CancelledError, InterruptedError)):
        digests.get(paths[-1]).result(timeout=30)
    for p in paths:  # any digest that did complete is right
        fut = digests.get(p)
        if not fut.cancelled() and fut.exception(timeout=30) is None:
            assert fut.result() == sha256_file(p)
