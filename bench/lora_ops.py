"""Per-op time of the CPU multi-LoRA ops: vLLM's own, the minimal fix (serving/vllm_plugin.py's FIXED_OPS)
and the fast ones (serving/lora_ops.py), at SmolLM2-135M's shapes, interleaved, medians.

    OMP_NUM_THREADS=1 python bench/lora_ops.py                 # decode T = 1, 8, 32, 64; prefill T = 512, 2048
    python bench/lora_ops.py --slots 16 --rank 8 --threads 2

One "layer step" is what vLLM's CPU punica wrapper runs for one decoder layer: shrink + expand_slice for
q/k/v (fused qkv: 3 slices), o_proj, gate/up (2 slices) and down_proj, each with its own A and B.
SmolLM2-135M: hidden 576, q 576, k/v 192, intermediate 1536. Rows get slots round-robin over ``--slots``
(every row has an adapter: vLLM's own ops are then correct, so all three compute the same numbers, checked
once). Decode uses the bgmv ops (one index per row); prefill the sgmv ops with 4 sequences.
Prints a Markdown table (µs per layer step and the speed-ups) and writes ``--out`` (JSON).
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

HIDDEN, Q, KV, INTER = 576, 576, 192, 1536
# (input dim, output slices) of each LoRA-wrapped linear in a Llama layer
LINEARS = [(HIDDEN, (Q, KV, KV)), (Q, (HIDDEN,)), (HIDDEN, (INTER, INTER)), (INTER, (HIDDEN,))]


def make_layer(torch, slots: int, rank: int, dtype):
    gen = torch.Generator().manual_seed(0)
    layer = []
    for d_in, outs in LINEARS:
        a = [torch.randn(slots, 1, rank, d_in, generator=gen).to(dtype) for _ in outs]
        b = [torch.randn(slots, 1, o, rank, generator=gen).to(dtype) for o in outs]
        layer.append((d_in, outs, a, b))
    return layer


def step(ops, torch, layer, rows: int, idx, prefill, dtype) -> list:
    """One layer's LoRA work (returns the outputs, for the equality check)."""
    results = []
    for d_in, outs, a_list, b_list in layer:
        x = torch.ones(rows, d_in, dtype=dtype) * 0.01
        y = torch.zeros(rows, sum(outs), dtype=dtype)
        offset = 0
        for a, b, o in zip(a_list, b_list, outs):
            buf = torch.zeros(rows, a.shape[2], dtype=torch.float32)
            if prefill is None:
                ops["bgmv_shrink"](x, a, buf, idx, 0.5)
                ops["bgmv_expand_slice"](buf, b, y, idx, offset, o, True)
            else:
                starts, lens, seq_idx = prefill
                meta = (starts, lens, seq_idx, len(lens), int(lens.max()), rows)
                ops["sgmv_shrink"](x, a, buf, *meta, 0.5)
                ops["sgmv_expand_slice"](buf, b, y, *meta, offset, o, True)
            offset += o
        results.append(y)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", default=str(ROOT / "bench" / "lora-ops-results.json"))
    args = ap.parse_args(argv)

    import torch
    from vllm.lora.ops.torch_ops import lora_ops as vllm_ops

    from serving import lora_ops, vllm_plugin

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    fixed = {**vllm_plugin.FIXED_OPS}
    fixed_sgmv = {  # the minimal fix's prefill ops: vLLM's sgmv calling the fixed bgmv
        "sgmv_shrink": lambda x, w, y, s, ln, i, *rest: fixed["bgmv_shrink"](x, w, y, torch.repeat_interleave(i, ln),
                                                                              rest[-1]),
        "sgmv_expand_slice": lambda x, w, y, s, ln, i, b, m, t, off, size, add: fixed["bgmv_expand_slice"](
            x, w, y, torch.repeat_interleave(i, ln), off, size, add),
    }
    variants = {"vllm": {n: getattr(vllm_ops, n) for n in lora_ops.FAST_OPS},
                "fixed": {**fixed, **fixed_sgmv}, "fast": lora_ops.FAST_OPS}
    layer = make_layer(torch, args.slots, args.rank, dtype)
    shapes = [("decode", t) for t in (1, 8, 32, 64)] + [("prefill", t) for t in (512, 2048)]
    rows_out = []
    for kind, rows in shapes:
        idx = torch.arange(rows) % args.slots
        prefill = None
        if kind == "prefill":
            lens = torch.full((4,), rows // 4)
            prefill = (torch.cumsum(lens, 0) - lens, lens, torch.arange(4) % args.slots)
        ref = step(variants["vllm"], torch, layer, rows, idx, prefill, dtype)
        for name in ("fixed", "fast"):
            got = step(variants[name], torch, layer, rows, idx, prefill, dtype)
            tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
            assert all(torch.allclose(g.float(), r.float(), atol=tol * (1 + r.abs().max().item())) for g, r in
                       zip(got, ref)), f"{name} differs from vLLM's ops at {kind} T={rows}"
        n = max(1, 2048 // rows)
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.repeats):  # interleaved
            for name, ops in variants.items():
                t0 = time.perf_counter()
                for _ in range(n):
                    step(ops, torch, layer, rows, idx, prefill, dtype)
                times[name].append((time.perf_counter() - t0) / n * 1e6)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows_out.append({"kind": kind, "rows": rows, "us_per_layer_step": {k: round(v, 1) for k, v in med.items()},
                         "fast_vs_vllm": round(med["vllm"] / med["fast"], 2),
                         "fast_vs_fixed": round(med["fixed"] / med["fast"], 2)})
    record = {"slots": args.slots, "rank": args.rank, "threads": args.threads, "dtype": args.dtype,
              "repeats": args.repeats, "command": "python bench/lora_ops.py " + " ".join(argv or sys.argv[1:]),
              "results": rows_out}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"| shape | T | vLLM µs | fixed µs | fast µs | fast vs vLLM | fast vs fixed |  "
          f"(slots {args.slots}, rank {args.rank}, {args.dtype}, {args.threads} thread(s))")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows_out:
        u = r["us_per_layer_step"]
        print(f"| {r['kind']} | {r['rows']} | {u['vllm']} | {u['fixed']} | {u['fast']} | "
              f"{r['fast_vs_vllm']}× | {r['fast_vs_fixed']}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
