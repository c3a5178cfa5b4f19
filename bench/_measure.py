"""Run one route as a whole process and measure it; score an adapter's captured energy.

Wall time is from spawn to exit (interpreter start and imports included). Peak RSS two ways:
``os.wait4``'s ``ru_maxrss`` (the largest single process among the route and the descendants it
reaped; taken by the small bench/_spawn.py so the driver's own memory does not leak into it), and
the peak of the summed RSS of the whole process tree, sampled every 20 ms from /proc (what matters
for ``--workers``, whose processes run at the same time; includes ~10 MiB of _spawn.py itself).
"""

from __future__ import annotations

import math
import os
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from pissa.core.formats import adapter as adapter_format


@dataclass(frozen=True)
class Run:
    seconds: float
    maxrss_mib: float  # largest single process (wait4)
    tree_mib: float  # peak of the sampled sum over the process tree
    returncode: int
    log: str


def _tree_rss_kib(pid: int) -> int:
    total, stack, seen = 0, [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    return total


def run_process(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> Run:
    """Run ``cmd`` to completion (through bench/_spawn.py); stdout+stderr go to ``log_path``."""
    import json
    import sys

    peak = [0]
    result = log_path.with_suffix(".run.json")
    result.unlink(missing_ok=True)
    spawn = [sys.executable, "-S", str(Path(__file__).with_name("_spawn.py")), str(result), *cmd]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(spawn, stdout=log, stderr=subprocess.STDOUT, env=env)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _tree_rss_kib(proc.pid))
                done.wait(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        returncode = proc.wait()
        done.set()
        sampler.join()
    if not result.exists():
        return Run(math.nan, math.nan, peak[0] / 1024, returncode or 1, log_path.read_text()[-3000:])
    measured = json.loads(result.read_text())
    return Run(
        measured["seconds"], measured["maxrss_kib"] / 1024, peak[0] / 1024, measured["exit"],
        log_path.read_text()[-3000:],
    )


def weight_norms_sq(folder: Path, keys: list[str]) -> dict[str, float]:
    """‖W‖_F² (float64) of each tensor ``key`` of a safetensors checkpoint folder."""
    import json

    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    files = json.loads(index.read_text())["weight_map"] if index.exists() else dict.fromkeys(keys, "model.safetensors")
    out: dict[str, float] = {}
    by_file: dict[str, list[str]] = {}
    for k in keys:
        by_file.setdefault(files[k], []).append(k)
    for fname, ks in by_file.items():
        with safe_open(str(folder / fname), framework="pt") as f:
            for k in ks:
                out[k] = float(f.get_tensor(k).double().square().sum())
    return out


def adapter_energy(adapter_dir: Path, norms_sq: dict[str, float], scaling: float = 1.0) -> dict[str, float]:
    """Each adapter's share of ‖W‖²: ``‖s·B A‖_F² / ‖W‖_F²`` per weight key.

    ``‖BA‖_F² = tr((BᵀB)(AAᵀ))`` costs r×r work, no ``out×in`` product. For PiSSA adapters
    (``B = U√S``, ``A = √S Vᵀ`` with orthonormal U, V) it equals ``Σ_{i≤r} s_i²``, pissa.json's
    ``energy``, so every route is scored by the same formula from the files it wrote.
    """
    from safetensors.torch import load_file

    tensors = load_file(adapter_dir / adapter_format.WEIGHTS)
    out = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        b = tensors[key.replace(".lora_A.", ".lora_B.")].double()
        a = a.double()
        module = key.removeprefix("base_model.model.").replace(".lora_A.weight", "")
        ba_sq = float(torch.trace((b.T @ b) @ (a @ a.T)))
        out[f"{module}.weight"] = scaling**2 * ba_sq / norms_sq[f"{module}.weight"]
    return out


def captured(route: dict[str, float], exact: dict[str, float]) -> tuple[float, float]:
    """(mean, worst) of ``route / exact`` over the exact route's matrices (NaN if any is missing)."""
    if set(route) != set(exact):
        return math.nan, math.nan
    ratios = [route[k] / exact[k] for k in exact]
    return sum(ratios) / len(ratios), min(ratios)
