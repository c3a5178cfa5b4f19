"""Micro-benchmark of the top-r SVD alone: single-thread CPU time and captured energy per method.

Methods (each on the same float32 matrices, with the same per-matrix seed):

- ``baseline``: the randomized subspace iteration this project shipped before the block Krylov
  method (copied below verbatim, so the comparison survives changes to converter/svd.py);
- ``new``: ``converter.svd.top_r_svd`` with ``SvdOptions()`` defaults;
- ``peft``: ``torch.svd_lowrank(w, q=r, niter=16)``, what PEFT's ``pissa_niter_16`` runs;
- ``new-p16-tol1e-4`` (not run by default): the new algorithm with the values ConvertOptions
  still passes explicitly (oversample 16, svd_tol 1e-4).

Captured energy of a matrix = Σ_{i≤r} s_i² of the returned values / Σ_{i≤r} σ_i² of the exact values
(``torch.linalg.svdvals`` in float64, cached in ``--cache``). CPU time is ``time.process_time`` of
the SVD call only, with ``torch.set_num_threads(1)``; ``--repeat`` runs every method that many
times (interleaved) and reports each run, so noise from other load shows up as spread.

Usage::

    python bench/svd_micro.py                          # SmolLM2 + one shard of the synthetic model
    python bench/svd_micro.py --models smollm2 --repeat 3
    python bench/svd_micro.py --synth-shards 4         # all 63 synthetic matrices
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from converter.svd import SvdOptions, top_r_svd

MODELS = {
    "smollm2": "/tmp/pissa-bench/smollm2-bf16",
    "synth": "/tmp/pissa-bench/synth-llama-1gb",
}

Method = Callable[[torch.Tensor, int, int], torch.Tensor]  # (w, rank, seed) -> top-r singular values


def baseline_top_r(w: torch.Tensor, rank: int, seed: int) -> torch.Tensor:
    """The previous default (subspace iteration, l = r + 16, niter 10, tol 1e-4), verbatim."""
    niter, oversample, tol = 10, 16, 1e-4
    m, n = w.shape[-2], w.shape[-1]
    cols = min(rank + oversample, min(m, n))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, cols, generator=gen, dtype=torch.float32)

    def orth(x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.qr(x, mode="reduced")[0]

    wt = w.transpose(-2, -1)
    q = orth(w @ omega)
    previous = None
    for _ in range(niter):
        z, r = torch.linalg.qr(wt @ q, mode="reduced")
        q = orth(w @ z)
        if tol > 0:
            energy = torch.linalg.svdvals(r)[..., :rank].double().square().sum(dim=-1)
            if previous is not None and bool(((energy - previous) <= tol * energy).all()):
                break
            previous = energy
    b = q.transpose(-2, -1) @ w
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    _u = q @ ub  # U is part of the cost the converter pays
    return s[..., :rank]


def new_top_r(w: torch.Tensor, rank: int, seed: int) -> torch.Tensor:
    return top_r_svd(w, rank, SvdOptions(), seeds=[seed])[1]


def new_convert_defaults_top_r(w: torch.Tensor, rank: int, seed: int) -> torch.Tensor:
    """The new algorithm with ConvertOptions' current explicit values (oversample 16, tol 1e-4)."""
    return top_r_svd(w, rank, SvdOptions(oversample=16, tol=1e-4), seeds=[seed])[1]


def peft_top_r(w: torch.Tensor, rank: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)  # svd_lowrank draws from the global generator
    _, s, _ = torch.svd_lowrank(w, q=rank, niter=16)
    return s[:rank]


METHODS: dict[str, Method] = {
    "baseline": baseline_top_r,
    "new": new_top_r,
    "peft": peft_top_r,
    "new-p16-tol1e-4": new_convert_defaults_top_r,
}


def target_names(path: str) -> list[str]:
    with safe_open(path, framework="pt") as f:
        return sorted(k for k in f.keys() if k.endswith("_proj.weight"))  # noqa: SIM118


def load(model: str, synth_shards: int) -> list[tuple[str, torch.Tensor]]:
    """(key, float32 matrix) for every ``*_proj`` weight of the model (synth: its first shards)."""
    folder = MODELS[model]
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if model == "synth":
        files = files[:synth_shards]
    out = []
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in target_names(path):
                out.append((f"{Path(path).name}:{name}", f.get_tensor(name).float().contiguous()))
    return out


def exact_values(mats: list[tuple[str, torch.Tensor]], cache: Path) -> dict[str, torch.Tensor]:
    """Every singular value of every matrix in float64 (computed once, then read from ``cache``)."""
    known: dict[str, torch.Tensor] = torch.load(cache) if cache.exists() else {}
    missing = [(k, w) for k, w in mats if k not in known]
    for i, (key, w) in enumerate(missing):
        if i % 20 == 0:
            print(f"  exact svdvals {i + 1}/{len(missing)} ...", flush=True)
        known[key] = torch.linalg.svdvals(w.double())
    if missing:
        torch.save(known, cache)
    return known


def run(method: Method, mats: list[tuple[str, torch.Tensor]], rank: int) -> tuple[float, list[torch.Tensor]]:
    total, values = 0.0, []
    for i, (_, w) in enumerate(mats):
        t0 = time.process_time()
        s = method(w, rank, i)
        total += time.process_time() - t0
        values.append(s)
    return total, values


def captured(values: list[torch.Tensor], mats: list[tuple[str, torch.Tensor]], exact: dict, rank: int) -> list[float]:
    return [
        float(s.double().square().sum() / exact[k][:rank].square().sum()) for s, (k, _) in zip(values, mats)
    ]


def bench(
    model: str, methods: dict[str, Method], *, rank: int, repeat: int, synth_shards: int, cache: Path
) -> dict[str, dict]:
    mats = load(model, synth_shards)
    print(f"{model}: {len(mats)} matrices", flush=True)
    exact = exact_values(mats, cache)
    times: dict[str, list[float]] = {name: [] for name in methods}
    energies: dict[str, list[float]] = {}
    for _ in range(repeat):
        for name, fn in methods.items():
            seconds, values = run(fn, mats, rank)
            times[name].append(seconds)
            energies[name] = captured(values, mats, exact, rank)
    base = times.get("baseline")
    print(f"| {model} | method | CPU s (runs) | ratio vs baseline (per run) | captured mean | worst |")
    print("|---|---|---|---|---|---|")
    result = {}
    for name in methods:
        t, e = times[name], energies[name]
        ratios = [a / b for a, b in zip(t, base)] if base else []
        result[name] = {"cpu": t, "ratio": ratios, "mean": statistics.fmean(e), "worst": min(e)}
        print(
            f"| {model} | {name} | {' '.join(f'{x:.2f}' for x in t)} | "
            f"{' '.join(f'{x:.3f}' for x in ratios) or '-'} | {statistics.fmean(e):.5f} | {min(e):.5f} |",
            flush=True,
        )
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,synth")
    ap.add_argument("--methods", default="baseline,new,peft", help=f"any of {', '.join(METHODS)}")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--synth-shards", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/pissa-bench/svd-micro-exact.pt"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    methods = {name: METHODS[name] for name in args.methods.split(",")}
    for model in args.models.split(","):
        bench(model, methods, rank=args.rank, repeat=args.repeat, synth_shards=args.synth_shards, cache=args.cache)


if __name__ == "__main__":
    main()
