"""Masked or grouped: the two decode paths of serving/lora_fused.py, per call (issue 14).

``fused_lora_linear`` multiplies every row by every used slot's A and B and masks the other slots out:
at S' slots, S' times the arithmetic a row needs, in the fewest calls. ``grouped_lora_linear`` gathers
the rows by slot into a padded ``[S', t_max, in]`` block (``index_copy_``), runs one batched shrink and
one batched expand per slice (``bmm``) against each slot's own weights, and adds the results to their
rows (one ``index_add_`` after joining the slices): 1/S' of the arithmetic, plus a gather, a join and an
add, and the padding: the block has S'·t_max rows (t_max: the most rows of one slot). The plugin groups
when the slot range is ``GROUPED_MIN_SLOTS`` wide or more, the block holds at most ``GROUPED_MAX_PADDING``
times the rows and the joined output at most ``GROUPED_MAX_ELEMENTS``; the output says which path it
would take for each layer. Both paths are checked
against each other (fp32, 1e-4 relative) before timing.

SmolLM2-135M's four LoRA layer shapes (q/k/v, o, gate/up, down), rank 8, decode rows interleaved over
the slots (row b has slot b mod S), or with ``--hot K`` the first K rows on slot 0 and the rest
interleaved (one busy tenant); microseconds per call, median of ``--repeats`` interleaved repeats::

    OMP_NUM_THREADS=1 python bench/lora_grouping.py [--rows 32] [--slots 4] [--hot 0] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from serving.lora_fused import StepSlots, fused_lora_linear, grouped_lora_linear, row_groups, slot_mask

LAYERS = {"qkv": (576, (576, 192, 192)), "o": (576, (576,)), "gate_up": (576, (1536, 1536)), "down": (1536, (576,))}


def per_call_us(fn, calls: int) -> float:
    for _ in range(20):
        fn()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--hot", type=int, default=0, help="rows on slot 0 before the interleaved ones")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows, slots, r = args.rows, args.slots, args.rank
    idx = torch.arange(rows) % slots
    idx[: args.hot] = 0
    groups = row_groups(idx, 0, slots)
    step = StepSlots(idx)
    print(f"{rows} rows over {slots} slots ({args.hot} on slot 0 first; most on one slot: {groups[2]}), rank {r}, "
          f"{torch.get_num_threads()} thread(s); µs per call (median)")
    for name, (fan_in, outs) in LAYERS.items():
        m, g = measure_layer(fan_in, outs, idx, groups, r, args.repeats, args.calls)
        plugin = "grouped" if step.groups_for(outs) is not None else "masked"
        print(f"{name:<8} masked {m:7.1f}   grouped {g:7.1f}   grouped / masked {g / m:.2f}   (plugin: {plugin})")


def measure_layer(fan_in: int, outs: tuple[int, ...], idx: torch.Tensor, groups: tuple, r: int, repeats: int,
                  calls: int) -> tuple[float, float]:
    """Median µs per call of the masked and the grouped path for one layer shape (checked equal first)."""
    rows, slots, n = idx.numel(), int(idx.max()) + 1, len(outs)
    x = torch.randn(rows, fan_in)
    a = torch.randn(slots * n * r, fan_in)  # slot-major, as serving.lora_fused.stack_weights
    bs = [torch.randn(slots * r, size) for size in outs]
    y_masked, y_grouped = torch.zeros(rows, sum(outs)), torch.zeros(rows, sum(outs))
    mask = slot_mask(idx, 0, slots, n, r, 1.0)

    def masked() -> None:
        fused_lora_linear(y_masked, x, a, bs, 0, slots, mask, 1.0, outs, r)

    def grouped() -> None:
        grouped_lora_linear(y_grouped, x, a, bs, 0, slots, groups, 1.0, outs, r)

    masked()
    grouped()
    torch.testing.assert_close(y_grouped, y_masked, rtol=1e-4, atol=1e-3)
    times: dict[str, list[float]] = {"masked": [], "grouped": []}
    for _ in range(repeats):  # interleaved
        times["masked"].append(per_call_us(masked, calls))
        times["grouped"].append(per_call_us(grouped, calls))
    return statistics.median(times["masked"]), statistics.median(times["grouped"])


if __name__ == "__main__":
    main()
