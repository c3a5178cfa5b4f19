"""The one sha256-of-a-file helper (bundles, exports, runs and pushes all record file checksums)."""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import Future


def sha256_file(path: str | os.PathLike[str], chunk: int = 8 << 20, stop: threading.Event | None = None) -> str:
    """Hex sha256 of a file, read in chunks (8 MiB by default).

    Raises:
        InterruptedError: ``stop`` was set before the file was read to its end.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if stop is not None and stop.is_set():
                raise InterruptedError(f"hashing {os.fspath(path)} was cancelled")
            h.update(block)
    return h.hexdigest()


class BackgroundDigests:
    """sha256 of several files, hashed one after another in a background (daemon) thread.

    hashlib releases the GIL, so the hashing runs on another core while the caller goes on (e.g.
    ``pissa convert`` hashes the source shards while it imports torch). ``get`` returns the future
    of one file's digest, or None for a file that was not asked for. ``cancel`` stops the work
    between chunks; being a daemon, the thread never delays the exit of a failing command.
    """

    def __init__(self, paths: list[str | os.PathLike[str]], chunk: int = 8 << 20) -> None:
        self._futures: dict[str, Future[str]] = {os.fspath(p): Future() for p in paths}
        self._stop = threading.Event()
        self._chunk = chunk
        threading.Thread(target=self._run, name="sha256", daemon=True).start()

    def _run(self) -> None:
        for path, fut in self._futures.items():
            if self._stop.is_set() or not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(sha256_file(path, self._chunk, stop=self._stop))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for the digest
                fut.set_exception(exc)

    def get(self, path: str | os.PathLike[str]) -> Future[str] | None:
        return self._futures.get(os.fspath(path))

    def cancel(self) -> None:
        self._stop.set()
        for fut in self._futures.values():
            fut.cancel()


def git_blob_sha1(content: bytes | os.PathLike[str]) -> str:
    """Git's object id of a blob (``sha1(b"blob <size>\\0" + content)``): how the Hub names a non-LFS file.

    Args:
        content: the bytes, or a file read in chunks.
    """
    if isinstance(content, bytes):
        return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
    h = hashlib.sha1(b"blob %d\0" % os.path.getsize(content))
    with open(content, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()
