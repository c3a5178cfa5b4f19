"""Time per decoder layer of the CPU multi-LoRA ops: vLLM's own, the minimal fix (serving/vllm_plugin.py's
FIXED_OPS), the fast ops (serving/lora_ops.py) and the fused layer call (serving/lora_fused.py), at
SmolLM2-135M's shapes, interleaved, medians.

    OMP_NUM_THREADS=1 python bench/lora_ops.py                 # decode T = 1, 8, 32, 64; prefill T = 512, 2048
    python bench/lora_ops.py --slots 16 --rank 8 --threads 2

One "layer step" is what vLLM's CPU punica wrapper runs for one decoder layer: shrink + expand_slice for
q/k/v (fused qkv: 3 slices), o_proj, gate/up (2 slices) and down_proj, each with its own A and B.
SmolLM2-135M: hidden 576, q 576, k/v 192, intermediate 1536. Rows get slots round-robin over ``--slots``
(every row has an adapter: vLLM's own ops are then correct, so all variants compute the same numbers, checked
once). vLLM's V1 engine runs every step through the sgmv ops, with runs of equal consecutive slot indices
(``compute_meta``); at decode, requests of different adapters interleave, so every row is its own run. Prefill:
4 prompts of T/4 tokens. Variants: ``vllm`` (its torch ops), ``fixed``, ``fast`` (serving/lora_ops.py, per
slice, as vLLM's wrapper calls them) and ``fused`` (serving/lora_fused.py: all slices of a layer in one
call for fewer than 256 rows; the fast ops above that), the last as the plugin installs it: its GEMMs on packed
matrices by vLLM's oneDNN; ``fused_torch`` is the same call with torch's GEMMs (``PISSA_LORA_ONEDNN=0``).
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


def torch_gemms(lora_fused, linear):
    """``linear`` with the fused path's GEMMs in torch (``PISSA_LORA_ONEDNN=0``) instead of vLLM's oneDNN."""

    def call(*args, **kwargs):
        before, lora_fused.USE_ONEDNN = lora_fused.USE_ONEDNN, False
        try:
            return linear(*args, **kwargs)
        finally:
            lora_fused.USE_ONEDNN = before

    return call


def make_layer(torch, slots: int, rank: int, dtype):
    gen = torch.Generator().manual_seed(0)
    layer = []
    for d_in, outs in LINEARS:
        a = tuple(torch.randn(slots, 1, rank, d_in, generator=gen).to(dtype) for _ in outs)  # one tuple per
        b = tuple(torch.randn(slots, 1, o, rank, generator=gen).to(dtype) for o in outs)  # layer, as in vLLM
        layer.append((d_in, outs, a, b))
    return layer


def per_op_linear(ops, meta):
    """vLLM's ``PunicaWrapperCPU.add_lora_linear`` over ``ops``: one shrink and one expand per output slice."""
    def add_lora_linear(wrapper, y, x, a_list, b_list, scale, outs, *, buffer=None, **kwargs):
        import torch

        offset = 0
        for a, b, o in zip(a_list, b_list, outs):
            buf = torch.zeros(x.shape[0], a.shape[2], dtype=torch.float32)
            ops["sgmv_shrink"](x, a, buf, *meta, scale)
            ops["sgmv_expand_slice"](buf, b, y, *meta, offset, o, True)
            offset += o
    return add_lora_linear


class Wrapper:
    """The part of vLLM's punica wrapper the fused path reads (and caches on): the indices buffer vLLM
    rewrites once per step and its live length. Set once here, so the fused path's once-per-step work (slot
    range and masks, timed separately as ``per_step_us``) is not in the per-layer figure."""

    def __init__(self, idx):
        import torch

        self._token_lora_indices = torch.full((4096,), -1, dtype=idx.dtype)
        self._token_lora_indices[:len(idx)].copy_(idx)
        self.indices_len = [len(idx)]

    @property
    def token_lora_indices(self):
        return self._token_lora_indices[:self.indices_len[0]]


def step(linear, torch, layer, rows: int, wrapper, dtype) -> list:
    """One layer's LoRA work through ``linear`` (an ``add_lora_linear``); returns the outputs for the check."""
    results = []
    for d_in, outs, a_list, b_list in layer:
        x = torch.ones(rows, d_in, dtype=dtype) * 0.01
        y = torch.zeros(rows, sum(outs), dtype=dtype)
        linear(wrapper, y, x, a_list, b_list, 0.5, outs)
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
    from vllm.lora.punica_wrapper.utils import compute_meta  # V1 runs every step, decode too, through sgmv

    from serving import lora_fused, lora_ops, vllm_plugin

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    fixed = {**vllm_plugin.FIXED_OPS}
    fixed_sgmv = {  # the minimal fix's prefill ops: vLLM's sgmv calling the fixed bgmv
        "sgmv_shrink": lambda x, w, y, s, ln, i, *rest: fixed["bgmv_shrink"](x, w, y, torch.repeat_interleave(i, ln),
                                                                              rest[-1]),
        "sgmv_expand_slice": lambda x, w, y, s, ln, i, b, m, t, off, size, add: fixed["bgmv_expand_slice"](
            x, w, y, torch.repeat_interleave(i, ln), off, size, add),
    }
    ops = {"vllm": {n: getattr(vllm_ops, n) for n in lora_ops.FAST_OPS}, "fixed": {**fixed, **fixed_sgmv},
           "fast": lora_ops.FAST_OPS}
    layer = make_layer(torch, args.slots, args.rank, dtype)
    shapes = [("decode", t) for t in (1, 8, 32, 64)] + [("prefill", t) for t in (512, 2048)]
    rows_out = []
    for kind, rows in shapes:
        # decode: one token per request, requests' adapters interleaved round-robin; prefill: 4 prompts
        idx = torch.arange(rows) % args.slots if kind == "decode" else \
            torch.repeat_interleave(torch.arange(4) % args.slots, rows // 4)
        meta = compute_meta(idx)[:6]  # the sgmv ops' arguments: runs of equal consecutive slot indices
        variants = {name: per_op_linear(o, meta) for name, o in ops.items()}
        variants["fused"] = lora_fused.make_add_lora_linear(variants["fast"])
        variants["fused_torch"] = torch_gemms(lora_fused, lora_fused.make_add_lora_linear(variants["fast"]))
        ref = step(variants["vllm"], torch, layer, rows, Wrapper(idx), dtype)
        for name in ("fixed", "fast", "fused", "fused_torch"):
            got = step(variants[name], torch, layer, rows, Wrapper(idx), dtype)
            tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
            assert all(torch.allclose(g.float(), r.float(), atol=tol * (1 + r.abs().max().item())) for g, r in
                       zip(got, ref)), f"{name} differs from vLLM's ops at {kind} T={rows}"
        n = max(1, 2048 // rows)
        times: dict[str, list[float]] = {k: [] for k in variants}
        wrappers = {k: Wrapper(idx) for k in variants}  # the fused path's caches live on the wrapper, as in vLLM
        for _ in range(args.repeats):  # interleaved
            for name, linear in variants.items():
                t0 = time.perf_counter()
                for _ in range(n):
                    step(linear, torch, layer, rows, wrappers[name], dtype)
                times[name].append((time.perf_counter() - t0) / n * 1e6)
        med = {k: statistics.median(v) for k, v in times.items()}
        per_step = None  # the fused path's once-per-step work (slot range, the layers' masks); none at prefill
        if rows < lora_fused.FUSED_MAX_ROWS:
            t0 = time.perf_counter()
            for _ in range(n):
                step_slots = lora_fused.StepSlots(idx)
                for _d_in, outs, a_list, _b in layer:
                    step_slots.mask(len(outs), a_list[0].shape[2], 0.5)
            per_step = round((time.perf_counter() - t0) / n * 1e6, 1)
        rows_out.append({"kind": kind, "rows": rows, "us_per_layer_step": {k: round(v, 1) for k, v in med.items()},
                         "fused_vs_vllm": round(med["vllm"] / med["fused"], 2),
                         "fused_vs_fixed": round(med["fixed"] / med["fused"], 2),
                         "fused_vs_fused_torch": round(med["fused_torch"] / med["fused"], 2),
                         "fused_per_step_us": per_step})
    record = {"slots": args.slots, "rank": args.rank, "threads": args.threads, "dtype": args.dtype,
              "repeats": args.repeats, "command": "python bench/lora_ops.py " + " ".join(argv or sys.argv[1:]),
              "results": rows_out}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"| shape | T | vLLM µs | fixed µs | fast µs | fused, torch GEMMs µs | fused µs | fused vs vLLM | fused vs "
          f"fixed | fused vs torch GEMMs | fused, once per step µs |  (slots {args.slots}, rank {args.rank}, "
          f"{args.dtype}, {args.threads} thread(s))")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows_out:
        u = r["us_per_layer_step"]
        print(f"| {r['kind']} | {r['rows']} | {u['vllm']} | {u['fixed']} | {u['fast']} | {u['fused_torch']} | "
              f"{u['fused']} | {r['fused_vs_vllm']}× | {r['fused_vs_fixed']}× | {r['fused_vs_fused_torch']}× | "
              f"{r['fused_per_step_us'] or '–'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
