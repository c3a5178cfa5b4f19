"""Make glibc's malloc reuse the memory of freed matrices instead of returning it to the kernel.

A conversion allocates and frees buffers of one matrix's size again and again (the tensor read,
its float32 copy, the residual cast). glibc serves every block above its mmap threshold (at most
32 MiB by its own heuristic; a 2048×5632 float32 matrix is 46 MiB) with a fresh ``mmap`` and
returns it with ``munmap`` when freed, so every buffer is faulted in page by page and zeroed by the
kernel again: on the 1.07 GB synthetic Llama of ``bench/convert.py`` that was ~1.0 M page faults
and 3.9 s of system time in a 9.5 s run. With the threshold raised (blocks come from the heap and
are reused), the heap trimmed only above 256 MiB of free top, and one arena (threads share it, so
memory freed by a factoring thread is reused by the reading thread instead of piling up per
thread), the same run takes ~0.2 M faults, 2.5 s of system time and 8.5 s, at a lower peak RSS.
Measured with ``/usr/bin/time -v pissa convert /tmp/pissa-bench/synth-llama-1gb OUT -q``.

This changes the whole process, so the CLI (``pissa convert``, ``pissa zoo``) and the converter's
worker processes call :func:`tune_allocator`; library callers decide for themselves. It is a no-op
where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

SETTINGS = ((M_MMAP_THRESHOLD, 1 << 30), (M_TRIM_THRESHOLD, 256 << 20), (M_ARENA_MAX, 1))
_done = False


def tune_allocator() -> bool:
    """Apply :data:`SETTINGS` once per process with ``mallopt``; True if glibc accepted them all."""
    global _done
    if _done:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = all(libc.mallopt(param, value) == 1 for param, value in SETTINGS)
    except (OSError, AttributeError):
        return False
    log.debug("malloc tuned for large reusable buffers: %s", ok)
    _done = ok
    return ok
