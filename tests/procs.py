"""Process helpers shared by the server and launcher tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


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


def serve_manifest(base: Path, adapters: dict[str, Path], *, port: int, **vllm: object) -> str:
    """A serving manifest (YAML) for ``base`` served as ``base`` with ``adapters``, fp32, 64M KV cache."""
    settings = {"port": port, "dtype": "float32", "max_model_len": 256, "kv_cache_memory_bytes": "64M", **vllm}
    return (
        f"base:\n  path: {base}\n  served_name: base\nadapters:\n"
        + "".join(f"  - name: {n}\n    path: {p}\n" for n, p in adapters.items())
        + "vllm:\n" + "".join(f"  {k}: {v}\n" for k, v in settings.items())
        + "extra_args: [--enforce-eager]\n"
    )


def start_pissa_serve(args: list[str], out_path: Path, *, timeout: float = 300, env: dict[str, str] | None = None,
                      ready: str = "vLLM is up"):
    """``python -m pissa serve ARGS`` with stdout and stderr in ``out_path``; returns the process once it
    says ``ready`` (the test fails with the output's tail if it exits or times out first)."""
    import subprocess
    import sys
    import time

    import pytest

    with open(out_path, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pissa", "serve", *args],
                                stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + timeout
    while ready not in out_path.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("pissa serve did not come up:\n" + out_path.read_text()[-3000:])
        time.sleep(0.5)
    return proc


def serve_from_manifest(root: Path, base: Path, adapters: dict[str, Path], *, timeout: float = 300,
                        **vllm: object) -> tuple[str, Path, Any]:
    """Write :func:`serve_manifest` into ``root`` (free port) and start ``pissa serve`` on it.

    Returns ``(url, vLLM log path, process)``; the command's output is in ``root / "pissa-serve.out"``.
    """
    port = free_port()
    manifest = root / "serve.yaml"
    manifest.write_text(serve_manifest(base, adapters, port=port, **vllm))
    log = root / "vllm.log"
    proc = start_pissa_serve([str(manifest), "--log-file", str(log)], root / "pissa-serve.out", timeout=timeout)
    return f"http://127.0.0.1:{port}", log, proc
