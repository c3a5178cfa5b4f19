"""A trained QPiSSA run, exported and served on the untouched base through ``pissa serve`` (issue 15, item 4).

Takes a QPiSSA training run (``pissa train`` of a packed ``--quantize nf4`` bundle, e.g. the ``qpissa``
run of ``bench/converge.py --quant``) and scores the shipped held-out arithmetic prompts (greedy, first
integer of the answer == the reference, as ``training.tasks.accuracy``) three ways:

- ``quantized``: the 4-bit residual ``deq(Q)`` + the trained adapter, in-process (transformers +
  bitsandbytes + PEFT, float32, bitsandbytes' dequantize-then-matmul path as in training);
- ``exported_peft``: the untouched base ``W`` + the exported LoRA ``ΔW = s·(B′A′ − B₀A₀)``
  (``pissa export``), in-process (transformers + PEFT, float32);
- ``exported_served``: the same exported LoRA served next to the base by the real command line
  ``pissa serve --base BASE --adapter qpissa=EXPORT --dtype float32 --kv-cache 256M --port P``
  (vLLM's OpenAI server, chat completions, temperature 0), and the base alone through the same server.

The first two differ by what a LoRA on ``W`` cannot carry, ``deq(Q) + s·B₀A₀ − W`` (the export's
``quant_gap``, printed); the last two by vLLM against transformers numerics only.

Usage::

    python bench/quant_serve.py --run /tmp/q2conv/qpissa --base ~/.cache/pissa/gguf/<digest> --out /tmp/qserve

``--base`` is the folder the QPiSSA bundle was converted from (pissa.json ``source.path``; the default).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from converge import exact_4bit  # noqa: E402  (the same 4-bit scoring path as bench/converge.py)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> float:
    """Seconds until ``GET url/health`` answers 200; raises if ``proc`` exits or the time runs out."""
    from serving.launcher import http_ok

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"pissa serve exited with {proc.returncode} before it was healthy")
        if http_ok(url + "/health", timeout=5):
            return time.perf_counter() - t0
        time.sleep(1)
    raise SystemExit(f"pissa serve was not healthy after {timeout:.0f} s")


def served_answers(url: str, model: str, prompts: list[str], max_tokens: int, concurrency: int) -> list[str]:
    """Greedy chat-completion answers of ``model`` to ``prompts``, in order."""
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)

    def one(prompt: str) -> str:
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=max_tokens, temperature=0)
        return (r.choices[0].message.content or "").strip()

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, prompts))


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve an exported QPiSSA adapter with pissa serve and score it.")
    parser.add_argument("--run", type=Path, required=True, help="QPiSSA training run (pissa train of a packed bundle).")
    parser.add_argument("--base", type=Path, default=None,
                        help="Untouched base folder (default: the bundle's source.path in pissa.json).")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--heldout", type=int, default=100, help="Held-out prompts scored (max 100).")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=8, help="Requests in flight to the server.")
    parser.add_argument("--health-timeout", type=float, default=600)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from converter.export import export
    from pissa.core.formats import run as run_format
    from pissa.core.formats.bundle import open_bundle
    from pissa.core.jsonio import read_json
    from serving.vllm_env import free_port
    from training.data import read_records
    from training.tasks import ARITH_HELDOUT, Accuracy, accuracy, is_correct
    from training.train import load_tokenizer

    record = read_json(args.run / run_format.RECORD)
    qbundle = Path(record["bundle"])
    b = open_bundle(qbundle)
    base = args.base or Path(b.manifest["source"]["path"])
    args.out.mkdir(parents=True, exist_ok=True)
    heldout = read_records(ARITH_HELDOUT)[: args.heldout]
    prompts = [r["prompt"] for r in heldout]
    tok = load_tokenizer(b)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    exported = args.out / "qpissa-exported"
    report = export(args.run, exported, overwrite=True)
    timings["export_s"] = time.perf_counter() - t
    gaps = [layer.quant_gap for layer in report.layers if layer.quant_gap is not None]

    results: dict[str, Accuracy] = {}
    t = time.perf_counter()
    q = exact_4bit(AutoModelForCausalLM.from_pretrained(qbundle, dtype=torch.float32, device_map={"": "cpu"}))
    results["quantized"] = accuracy(PeftModel.from_pretrained(q, args.run / "adapter").eval(), tok, heldout)
    del q
    original = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    results["exported_peft"] = accuracy(PeftModel.from_pretrained(original, exported).eval(), tok, heldout)
    del original
    timings["in_process_s"] = time.perf_counter() - t

    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "pissa", "serve", "--base", str(base), "--adapter", f"qpissa={exported}",
               "--served-name", "base", "--dtype", "float32", "--kv-cache", "256M", "--port", str(port),
               "--log-file", str(args.out / "vllm.log")]
    print("$", " ".join(command), flush=True)
    with open(args.out / "pissa-serve.out", "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        timings["serve_startup_s"] = wait_healthy(url, proc, args.health_timeout)
        t = time.perf_counter()
        served = {model: served_answers(url, model, prompts, 8, args.concurrency) for model in ("qpissa", "base")}
        timings["served_answers_s"] = time.perf_counter() - t
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for model, answers in served.items():
        name = "exported_served" if model == "qpissa" else "base_served"
        correct = sum(is_correct(a, r["response"]) for a, r in zip(answers, heldout))
        results[name] = Accuracy(correct=correct, total=len(heldout), answers=tuple(answers))
    same = sum(a == p for a, p in zip(results["exported_served"].answers, results["exported_peft"].answers))

    summary = {
        "run": str(args.run),
        "qbundle": str(qbundle),
        "quantization": b.manifest.get("quantization"),
        "base": str(base),
        "exported": str(exported),
        "export_rank": report.rank,
        "quant_gap": {"mean": sum(gaps) / len(gaps), "max": max(gaps)} if gaps else None,
        "serve_command": " ".join(command),
        "serve_exit": proc.returncode,
        "heldout_accuracy": {k: {"correct": v.correct, "total": v.total, "accuracy": v.accuracy,
                                 "sample_answers": list(v.answers[:5])} for k, v in results.items()},
        "served_equals_peft_answers": same,
        "timings_s": timings,
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    (args.out / "quant-serve.json").write_text(json.dumps(summary, indent=2) + "\n")
    for k, v in results.items():
        print(f"held-out accuracy, {k:<16} {v.correct}/{v.total}")
    print(f"served answers equal to transformers + PEFT's: {same}/{len(heldout)}")
    if gaps:
        print(f"quant_gap (‖deq(Q) + s·B₀A₀ − W‖ / ‖ΔW‖ per layer): mean {summary['quant_gap']['mean']:.3f}, "
              f"max {summary['quant_gap']['max']:.3f}")
    print(f"pissa serve: ready in {timings['serve_startup_s']:.0f} s, exit {proc.returncode}; "
          f"{args.out / 'quant-serve.json'}")


if __name__ == "__main__":
    main()
