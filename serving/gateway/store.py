"""The gateway's SQLite file (``usage_db``): token usage per tenant, model and day, and runtime grants.

Tables::

    usage(day, tenant, model, requests, prompt_tokens, completion_tokens)   -- day: UTC date, ISO
    runtime_adapters(name, path, added)     -- adapters loaded through the gateway at run time
    grants(model, tenant)                   -- which tenants may call them

The gateway writes usage from one background thread (:class:`UsageWriter`: batched, flushed at least
every :data:`FLUSH_INTERVAL` s and on shutdown), so a request never waits for the disk; the running
totals of today that the daily token limits need are kept in memory, seeded from the file at start.
Everything else here is small synchronous functions that open, act and close.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import queue
import sqlite3
import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pissa.core.errors import CorruptCheckpointError, OutputWriteError

logger = logging.getLogger(__name__)

FLUSH_INTERVAL = 0.2
SCHEMA = """
CREATE TABLE IF NOT EXISTS usage(
    day TEXT NOT NULL, tenant TEXT NOT NULL, model TEXT NOT NULL,
    requests INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
    PRIMARY KEY (day, tenant, model));
CREATE TABLE IF NOT EXISTS runtime_adapters(name TEXT PRIMARY KEY, path TEXT NOT NULL, added TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS grants(model TEXT NOT NULL, tenant TEXT NOT NULL, PRIMARY KEY (model, tenant));
"""


def today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).date().isoformat()


@contextlib.contextmanager
def connect(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection with the schema in place; commits on success, always closes.

    Raises:
        OutputWriteError: ``path`` cannot be opened or written; CorruptCheckpointError: it is not an SQLite
        database (one line each).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=30)
    except (OSError, sqlite3.Error) as exc:
        raise _unopenable(path, exc) from None
    try:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(SCHEMA)
        except sqlite3.OperationalError as exc:  # cannot open or write it (permissions, a folder, locked)
            raise _unopenable(path, exc) from None
        except sqlite3.DatabaseError as exc:  # not an SQLite database
            raise _unusable(path, exc) from None
        with conn:
            yield conn
    finally:
        conn.close()


def _unopenable(path: Path, exc: Exception) -> OutputWriteError:
    return OutputWriteError(f"cannot open the usage database {path}: {exc}",
                            fix="check its folder and permissions (and that no other program holds it locked), "
                                "or set gateway.usage_db to another file")


def _unusable(path: Path, exc: Exception) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"usage database {path} is unusable: {exc}", path=str(path),
        fix=f"restore {path}, or set gateway.usage_db to a new file (usage and runtime grants then start empty)")


@dataclass(frozen=True)
class UsageRow:
    day: str
    tenant: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def usage_rows(path: Path, *, since: str | None = None, tenant: str | None = None) -> list[UsageRow]:
    """Usage rows (day, tenant, model order), from ``since`` (an ISO date) on."""
    if not path.exists():
        return []
    sql = "SELECT day, tenant, model, requests, prompt_tokens, completion_tokens FROM usage WHERE 1=1"
    args: list[str] = []
    if since:
        sql, args = sql + " AND day >= ?", [*args, since]
    if tenant:
        sql, args = sql + " AND tenant = ?", [*args, tenant]
    with connect(path) as conn:
        return [UsageRow(*r) for r in conn.execute(sql + " ORDER BY day, tenant, model", args)]


def tokens_on(path: Path, day: str) -> dict[str, int]:
    """Total tokens per tenant on ``day``."""
    if not path.exists():
        return {}
    with connect(path) as conn:
        rows = conn.execute("SELECT tenant, SUM(prompt_tokens + completion_tokens) FROM usage WHERE day = ? "
                            "GROUP BY tenant", (day,))
        return {t: int(n or 0) for t, n in rows}


# --- runtime adapters and grants ----------------------------------------------------------------
def record_runtime_adapter(path: Path, name: str, adapter_path: str, tenants: Iterable[str]) -> None:
    """Remember an adapter loaded at run time and the tenants it was granted to (replacing older grants)."""
    added = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    with connect(path) as conn:
        conn.execute("INSERT OR REPLACE INTO runtime_adapters VALUES (?, ?, ?)", (name, adapter_path, added))
        conn.execute("DELETE FROM grants WHERE model = ?", (name,))
        conn.executemany("INSERT INTO grants VALUES (?, ?)", [(name, t) for t in dict.fromkeys(tenants)])


def forget_model(path: Path, name: str) -> None:
    """A removed adapter leaves every runtime record."""
    with connect(path) as conn:
        conn.execute("DELETE FROM runtime_adapters WHERE name = ?", (name,))
        conn.execute("DELETE FROM grants WHERE model = ?", (name,))


def runtime_adapters(path: Path) -> dict[str, str]:
    """name -> path of the adapters loaded at run time (for the next start)."""
    if not path.exists():
        return {}
    with connect(path) as conn:
        return dict(conn.execute("SELECT name, path FROM runtime_adapters ORDER BY added, name"))


def grants(path: Path) -> dict[str, set[str]]:
    """tenant -> models granted at run time."""
    out: dict[str, set[str]] = defaultdict(set)
    if not path.exists():
        return out
    with connect(path) as conn:
        for model, tenant in conn.execute("SELECT model, tenant FROM grants"):
            out[tenant].add(model)
    return out


# --- the gateway's writer -----------------------------------------------------------------------
class UsageWriter:
    """Counts usage in memory at once and writes it to SQLite from a background thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._day = today()
        self._today = defaultdict(int, tokens_on(path, self._day))
        self._queue: queue.Queue[tuple[str, str, str, int, int] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="pissa-usage-writer", daemon=True)
        self._thread.start()

    def tokens_today(self, tenant: str) -> int:
        day = today()
        if day != self._day:  # a new UTC day: the daily budgets start again
            self._day, self._today = day, defaultdict(int)
        return self._today[tenant]

    def add(self, tenant: str, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        day = today()
        self.tokens_today(tenant)
        self._today[tenant] += prompt_tokens + completion_tokens
        self._queue.put((day, tenant, model, prompt_tokens, completion_tokens))

    def close(self) -> None:
        """Write what is pending and stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        stop = False
        while not stop:
            item = self._queue.get()
            batch = []
            while item is not None:
                batch.append(item)
                try:
                    item = self._queue.get(timeout=FLUSH_INTERVAL if len(batch) < 1000 else 0)
                except queue.Empty:
                    break
            stop = item is None
            if batch:
                try:
                    self._write(batch)
                except (sqlite3.Error, CorruptCheckpointError, OutputWriteError) as exc:  # keep serving; counts in memory hold
                    logger.error("could not write usage to %s: %s", self.path, exc)

    def _write(self, batch: list[tuple[str, str, str, int, int]]) -> None:
        with connect(self.path) as conn:
            conn.executemany(
                "INSERT INTO usage VALUES (?, ?, ?, 1, ?, ?) ON CONFLICT(day, tenant, model) DO UPDATE SET "
                "requests = requests + 1, prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
                "completion_tokens = completion_tokens + excluded.completion_tokens", batch)
