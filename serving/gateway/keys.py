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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pissa.core.errors import CorruptCheckpointError, InvalidOptionsError, SourceNotFoundError
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


def read_keys(path: Path) -> list[KeyRecord]:
    """Every record of the keys file ([] when the file does not exist).

    Raises:
        CorruptCheckpointError: the file is not a keys file.
    """
    try:
        data = read_json(path, fix=f"restore {path} or move it away and add keys again")
    except SourceNotFoundError:
        return []
    try:
        return [KeyRecord(str(r["id"]), str(r["tenant"]), str(r["sha256"]), str(r["created"]))
                for r in data["keys"]]
    except (KeyError, TypeError) as exc:
        raise CorruptCheckpointError(f"{path} is not a pissa keys file (missing {exc})", path=str(path),
                                     fix=f"restore {path} or move it away and add keys again") from None


def _write_keys(path: Path, records: list[KeyRecord]) -> None:
    body = {"version": FORMAT_VERSION,
            "keys": [{"id": r.id, "tenant": r.tenant, "sha256": r.sha256, "created": r.created} for r in records]}
    write_json(path, body, mode=FILE_MODE)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def add_key(path: Path, tenant: str) -> tuple[str, KeyRecord]:
    """Create a key for ``tenant``; store its id and hash. Returns ``(key, record)``: the key is not kept."""
    with _locked(path):
        records = read_keys(path)
        taken = {r.id for r in records}
        kid = secrets.token_hex(4)
        while kid in taken:
            kid = secrets.token_hex(4)
        key = f"pissa-{kid}-{secrets.token_urlsafe(32)}"
        now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
        record = KeyRecord(kid, tenant, hash_key(key), now.isoformat().replace("+00:00", "Z"))
        _write_keys(path, [*records, record])
    return key, record


def revoke_key(path: Path, kid: str) -> KeyRecord:
    """Remove key ``kid``; returns its record.

    Raises:
        InvalidOptionsError: no such key id.
    """
    with _locked(path):
        records = read_keys(path)
        gone = [r for r in records if r.id == kid]
        if not gone:
            raise InvalidOptionsError(f"no key with id {kid!r} in {path}", [],
                                      fix="`pissa tenants list MANIFEST` shows the key ids")
        _write_keys(path, [r for r in records if r.id != kid])
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
