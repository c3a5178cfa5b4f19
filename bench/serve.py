"""Serving benchmark: throughput and p50/p95 latency, base only vs 1, 2 and 4 adapters mixed, one run.

    python bench/serve.py                         # tiny Llama + 4 random rank-8 tenants (fp32, CPU)
    python bench/serve.py --base DIR --adapter NAME=PATH ... [--requests 48 --max-tokens 32]

One vLLM server (started with ``serving.launcher.VllmServer``, the plugin fix active) serves the
base and every adapter, with ``max_loras`` = number of adapters so that a 4-adapter mix keeps all
slots busy. For each scenario the same N requests (prompts cycled) are sent at once from N client
threads (OpenAI client, non-streaming, greedy, ``ignore_eos`` so every request produces exactly
``--max-tokens`` tokens):

* ``base``: all requests to the base;
* ``k adapters``: requests spread round-robin over the first k adapters (no base request);
* ``base + 4 adapters``: round-robin over the base and 4 adapters (base rows share batches with
  adapter rows while every slot is busy: the case the plugin fixes).

Each scenario runs ``--repeats`` times, interleaved with the others; the run with the median
throughput is reported (with every repeat's tokens/s). Reported per scenario: wall time, completion tokens/s (all tokens / wall time), requests/s, and
p50/p95 per-request latency. The ratio of the 4-adapter mix to base only is printed at the end.
Results go to ``--out`` (JSON) and stdout (a Markdown table).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = ["What is 7 times 8?", "The capital of France is", "def add(a, b):", "The quick brown fox",
           "Question: what is 12 * 34?", "Hello world", "numbers 0 1 2 3", "Answer: 56. The"]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100 * len(s) + 0.5) - 1))
    return s[k]


def run_scenario(client, models: list[str], n: int, max_tokens: int) -> dict:
    def one(i: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        r = client.completions.create(model=models[i % len(models)], prompt=PROMPTS[i % len(PROMPTS)],
                                      max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True})
        return time.perf_counter() - t0, r.usage.completion_tokens

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=n) as pool:
        results = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    lat = [r[0] for r in results]
    tokens = sum(r[1] for r in results)
    return {"requests": n, "wall_s": round(wall, 3), "tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
            "requests_per_s": round(n / wall, 2), "p50_s": round(statistics.median(lat), 3),
            "p95_s": round(percentile(lat, 95), 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", help="base model folder (default: a tiny random Llama)")
    ap.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                    help="adapters (4 needed; default: 4 random rank-8 PEFT tenants of the base)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="runs per scenario; the median run is reported")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--kv-cache", default="256M")
    ap.add_argument("--port", type=int, default=8321)
    ap.add_argument("--out", default=str(ROOT / "bench" / "serve-results.json"))
    args = ap.parse_args(argv)

    from openai import OpenAI

    from serving.launcher import VllmServer, plan_serving
    from serving.manifest import VllmSettings, manifest_from_flags, parse_size

    work = Path(tempfile.mkdtemp(prefix="pissa-bench-serve-"))
    base = args.base
    if base is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import make_tiny_model

        base = str(make_tiny_model(work / "base"))
    adapters = list(args.adapter)
    if not adapters:
        from serving.testing import make_peft_adapter

        adapters = [f"t{k}={make_peft_adapter(base, work / f't{k}', seed=500 + k)}" for k in range(4)]
    if len(adapters) < 4:
        ap.error("give 4 adapters (or none for random tenants)")
    settings = VllmSettings(port=args.port, dtype=args.dtype, max_loras=len(adapters), max_model_len=512,
                            kv_cache_memory_bytes=parse_size(args.kv_cache), runtime_lora_updating=False)
    manifest = manifest_from_flags(base, adapters, served_name="base", settings=settings,
                                   extra_args=("--enforce-eager",))
    plan = plan_serving(manifest)
    names = [a.name for a in manifest.adapters]
    scenarios = {"base": ["base"], "1 adapter": names[:1], "2 adapters": names[:2], "4 adapters": names[:4],
                 "base + 4 adapters": ["base", *names[:4]]}
    results: dict[str, dict] = {}
    t0 = time.perf_counter()
    with VllmServer(plan, work / "vllm.log", health_timeout=300) as server:
        startup = time.perf_counter() - t0
        client = OpenAI(base_url=server.plan.url + "/v1", api_key="unused", max_retries=0, timeout=600)
        for models in scenarios.values():  # warm-up: load every adapter once, compile paths
            run_scenario(client, models, 4, 4)
        runs: dict[str, list[dict]] = {label: [] for label in scenarios}
        for _ in range(args.repeats):  # interleaved, so slow drift of a shared machine hits all alike
            for label, models in scenarios.items():
                runs[label].append(run_scenario(client, models, args.requests, args.max_tokens))
        for label, rs in runs.items():
            results[label] = sorted(rs, key=lambda r: r["tokens_per_s"])[len(rs) // 2]  # the median run
            results[label]["tokens_per_s_all_repeats"] = [r["tokens_per_s"] for r in rs]
    ratio = results["4 adapters"]["tokens_per_s"] / results["base"]["tokens_per_s"]
    record = {"base": base, "adapters": adapters, "requests": args.requests, "max_tokens": args.max_tokens,
              "repeats": args.repeats,
              "dtype": args.dtype, "startup_s": round(startup, 1), "scenarios": results,
              "ratio_4_adapters_to_base": round(ratio, 3)}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"| scenario | tokens/s | requests/s | p50 s | p95 s |  ({args.requests} concurrent requests × "
          f"{args.max_tokens} tokens, {args.dtype})")
    print("|---|---:|---:|---:|---:|")
    for label, r in results.items():
        print(f"| {label} | {r['tokens_per_s']} | {r['requests_per_s']} | {r['p50_s']} | {r['p95_s']} |")
    print(f"\nthroughput ratio, 4 adapters mixed / base only: {ratio:.2f}  (server start-up {startup:.0f} s)")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
