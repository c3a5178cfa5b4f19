"""Process helpers shared by the server and launcher tests."""

from __future__ import annotations

import os
from pathlib import Path


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def children(pid: int) -> dict[int, str]:
    """Live children of ``pid`` (from /proc): pid -> comm plus command line, for finding e.g. vLLM's
    ``VLLM::EngineCore``."""
    out: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) != pid:
                continue
            comm = stat[stat.index("(") + 1: stat.rindex(")")]
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError, IndexError):
            continue
        out[int(entry.name)] = f"{comm} {cmdline}"
    return out


def descendants(pid: int) -> set[int]:
    """Every live process whose ancestry reaches ``pid``."""
    out: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {c for p in frontier for c in children(p)} - out
        out |= frontier
    return out


def free_port() -> int:
    """A free TCP port on loopback (the project's own helper, re-used by every test that starts a server)."""
    from serving.vllm_env import free_port as _free

    return _free()
