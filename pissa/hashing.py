"""The one sha256-of-a-file helper (bundles, exports, runs and pushes all record file checksums)."""

from __future__ import annotations

import hashlib
import os


def sha256_file(path: str | os.PathLike[str], chunk: int = 8 << 20) -> str:
    """Hex sha256 of a file, read in chunks (8 MiB by default)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
