"""The keys file: which key belongs to which tenant, as key ids and SHA-256 hashes only (never keys).

A key reads ``pissa-<id>-<secret>``: ``id`` is 8 hex digits (shown by ``pissa tenants list``, used by
``revoke``), ``secret`` 32 random bytes (URL-safe base64). The file, mode 0600, is JSON::

    {"version": 1, "keys": [{"id": "3f9a0c1e", "tenant": "acme", "sha256": "…", "created": "2026-12-03T06:00:00Z"}]}

Writers (``pissa tenants add-key`` / ``revoke``) hold an exclusive lock on ``<file>.lock`` around the
read-modify-write and replace the file atomically; the gateway (:class:`KeyStore`) re-reads it when its
``stat`` changes, checked at most every :data:`RELOAD_INTERVAL` seconds, so added and revoked keys
take effect within a second without a restart. A hash is compared in constant time
(``hmac.compare_digest``), and a key with an unknown id is compared against a dummy hash as well.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pissa.core.errors import (
    CorruptCheckpointError,
    InvalidOptionsError,
    OutputWriteError,
    SourceNotFoundError,
)
from pissa.core.jsonio import read_json, write_json

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
FILE_MODE = 0o600
RELOAD_INTERVAL = 0.25  # seconds between stat() checks of the keys file
KEY_RE = re.compile(r"pissa-([0-9a-f]{8})-([A-Za-z0-9_-]{43})")
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()


@dataclass(frozen=True)
class KeyRecord:
    id: str
    tenant: str
    sha256: str
    created: str

    def public(self) -> dict[str, str]:
        """What may be shown: everything but the hash."""
        return {"id": self.id, "tenant": self.tenant, "created": self.created}


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_id(key: str) -> str | None:
    """The id part of a well-formed key, else None."""
    m = KEY_RE.fullmatch(key)
    return m.group(1) if m else None


_FIELDS = ("id", "tenant", "sha256", "created")


def _fix(path: Path) -> str:
    return f"restore {path} or move it away and add keys again"


def _read_body(path: Path) -> dict[str, Any]:
    """The keys file as written (``{"version": 1, "keys": []}`` when it does not exist), checked.

    Raises:
        CorruptCheckpointError: not a keys file, or one of another format version.
    """
    try:
        data = read_json(path, fix=_fix(path))
    except SourceNotFoundError:
        return {"version": FORMAT_VERSION, "keys": []}
    if "version" not in data:
        raise CorruptCheckpointError(f"{path} is not a pissa keys file (no version)", path=str(path), fix=_fix(path))
    if data.get("version") != FORMAT_VERSION:
        raise CorruptCheckpointError(
            f"{path} is a keys file of format version {data.get('version')!r}; this pissa reads version "
            f"{FORMAT_VERSION}", path=str(path),
            fix="use the pissa-pipeline that wrote it (this one would lose what it does not know)")
    records = data.get("keys")
    if not isinstance(records, list) or not all(
            isinstance(r, dict) and all(isinstance(r.get(f), str) for f in _FIELDS) for r in records):
        raise CorruptCheckpointError(f"{path} is not a pissa keys file (keys: a list of records with "
                                     f"{', '.join(_FIELDS)})", path=str(path), fix=_fix(path))
    return data


def _records(body: dict[str, Any]) -> list[KeyRecord]:
    return [KeyRecord(*(r[f] for f in _FIELDS)) for r in body["keys"]]


def read_keys(path: Path) -> list[KeyRecord]:
    """Every record of the keys file ([] when the file does not exist).

    Raises:
        CorruptCheckpointError: the file is not a keys file (or one of another format version).
    """
    return _records(_read_body(path))


def _write_keys(path: Path, body: dict[str, Any]) -> None:
    """Replace the file atomically; fields this version does not use (in the file or a record) stay."""
    try:
        write_json(path, body, mode=FILE_MODE)
    except OSError as exc:
        raise _unwritable(path, exc) from None


def _unwritable(path: Path, exc: OSError) -> OutputWriteError:
    return OutputWriteError(f"cannot write the keys file {path}: {exc.strerror or exc}",
                            fix="set gateway.keys_file to a file in a writable folder")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, FILE_MODE)
    except OSError as exc:
        raise _unwritable(path, exc) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def add_key(path: Path, tenant: str, deliver: Callable[[str, KeyRecord], None] | None = None) -> tuple[str, KeyRecord]:
    """Create a key for ``tenant``; store its id and hash. Returns ``(key, record)``: the key is not kept.

    ``deliver(key, record)`` is called while the file is still locked; when it raises ``OSError`` (the key
    could not be shown), the key is removed again and :class:`OutputWriteError` raised, so no key stays
    live that nobody saw.

    Raises:
        CorruptCheckpointError: the keys file is not one; OutputWriteError: it cannot be written, or
        ``deliver`` failed.
    """
    with _locked(path):
        body = _read_body(path)
        taken = {r["id"] for r in body["keys"]}
        kid = secrets.token_hex(4)
        while kid in taken:
            kid = secrets.token_hex(4)
        key = f"pissa-{kid}-{secrets.token_urlsafe(32)}"
        now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
        record = KeyRecord(kid, tenant, hash_key(key), now.isoformat().replace("+00:00", "Z"))
        before = list(body["keys"])
        _write_keys(path, {**body, "keys": [*before, {f: getattr(record, f) for f in _FIELDS}]})
        if deliver is not None:
            try:
                deliver(key, record)
            except OSError as exc:
                _write_keys(path, {**body, "keys": before})
                raise OutputWriteError(f"could not show the new key ({exc.strerror or exc}), so it was removed "
                                       "again", fix="run add-key again with a writable stdout") from None
    return key, record


def revoke_key(path: Path, kid: str) -> KeyRecord:
    """Remove key ``kid``; returns its record.

    Raises:
        InvalidOptionsError: no such key id.
    """
    with _locked(path):
        body = _read_body(path)
        gone = [r for r in _records(body) if r.id == kid]
        if not gone:
            raise InvalidOptionsError(f"no key with id {kid!r} in {path}", [],
                                      fix="`pissa tenants list MANIFEST` shows the key ids")
        _write_keys(path, {**body, "keys": [r for r in body["keys"] if r["id"] != kid]})
    return gone[0]


class KeyStore:
    """The gateway's view of the keys file, re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._by_id: dict[str, KeyRecord] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        self.refresh(force=True)

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def refresh(self, *, force: bool = False) -> None:
        """Re-read the file if it changed (checked at most every :data:`RELOAD_INTERVAL` s)."""
        now = time.monotonic()
        if not force and now - self._checked < RELOAD_INTERVAL:
            return
        with self._lock:
            self._checked = now
            stamp = self._stat()
            if stamp == self._stamp and not force:
                return
            try:
                records = read_keys(self.path)
            except CorruptCheckpointError as exc:
                self._stamp = stamp  # warn once per change of the file, not at every check
                logger.warning("keys file unreadable, keeping the previous keys: %s", exc)
                return
            self._by_id = {r.id: r for r in records}
            self._stamp = stamp
            logger.info("keys file loaded: %d key(s)", len(records))

    def authenticate(self, key: str) -> KeyRecord | None:
        """The record of a valid key, else None (constant-time hash comparison)."""
        self.refresh()
        kid = key_id(key)
        record = self._by_id.get(kid) if kid else None
        digest = hash_key(key)
        ok = hmac.compare_digest(digest, record.sha256 if record else _DUMMY_HASH)
        return record if ok and record is not None else None
