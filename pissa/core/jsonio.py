"""The one JSON reader and writer for every record the pipeline keeps (pissa.json, run.json, ...), and atomic text writes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pissa.core.errors import CorruptCheckpointError, SourceNotFoundError


def read_json(path: str | os.PathLike[str], *, fix: str | None = None) -> dict[str, Any]:
    """Read a JSON object.

    Raises:
        SourceNotFoundError: the file does not exist.
        CorruptCheckpointError: it cannot be read, is not JSON, or is not an object.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise SourceNotFoundError(f"{p} does not exist", path=str(p), fix=fix) from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CorruptCheckpointError(f"{p} is not valid JSON: {exc}", path=str(p), fix=fix) from exc
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"{p} does not hold a JSON object", path=str(p), fix=fix)
    return data


def is_number(value: Any) -> bool:
    """A JSON number as ``json`` reads it: an int or float, not a bool (which Python counts as an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def write_json(path: str | os.PathLike[str], data: Any, *, mode: int | None = None) -> None:
    """Write JSON atomically (see :func:`write_text`), indented, with a final newline."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n", mode=mode)


def write_text(path: str | os.PathLike[str], text: str, *, mode: int | None = None) -> None:
    """Write ``text`` atomically: a temporary file in the same folder, fsynced, then renamed over ``path``.

    ``mode`` (e.g. ``0o600`` for secrets) is the file's permission bits from its creation on, so the
    text is never readable by others, not even briefly.
    """
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
        if mode is not None:
            os.fchmod(fd, mode)  # the umask may have removed bits; never more than asked
        with open(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(p)
    finally:
        tmp.unlink(missing_ok=True)
