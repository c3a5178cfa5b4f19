"""Replicas benchmark: throughput of 2 replicas vs 1, and the latency gateway + router add over direct vLLM.

    python bench/replicas.py                      # tiny Llama + 3 random rank-8 adapters (fp32, CPU)
    python bench/replicas.py --requests 32 --max-tokens 32 --repeats 3 --pairs 60

Two deployments, one after the other, each started as a user would (``pissa serve MANIFEST`` with a
``tenants:`` section, so the gateway is in front): ``vllm.replicas: 1`` (gateway → vLLM) and
``vllm.replicas: 2`` (gateway → vllm-router → 2 vLLMs). Same base, adapters and settings.

* throughput: ``--requests`` requests at once from as many client threads (OpenAI client,
  non-streaming, greedy, ``ignore_eos``, ``--max-tokens`` tokens each), round-robin over the base and
  the adapters; ``--repeats`` runs, the median run reported (tokens/s, requests/s, p50/p95 latency).
  On a machine with few cores the two replicas share them: report, no goal.
* added latency (2 replicas): ``--pairs`` single requests (base, 1 token) alternately through the
  gateway (+ router) and straight to replica 1 on loopback (with the internal key); p50 and p99 of each
  and their difference.

Results go to ``--out`` (JSON) and stdout (Markdown).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serve import PROMPTS, percentile, run_scenario  # noqa: E402 - bench/serve.py, the same measure

INTERNAL = "bench-internal-key"


def free_port() -> int:
    from serving.vllm_env import free_port as _free

    return _free()


def start(work: Path, base: str, adapters: dict[str, str], replicas: int) -> tuple[subprocess.Popen, str, str, list[str]]:
    """``pissa serve`` with a gateway; returns (process, gateway URL, tenant key, replica URLs)."""
    port = free_port()
    root = work / f"replicas-{replicas}"
    root.mkdir()
    names = ["base", *adapters]
    (root / "serve.yaml").write_text(
        f"base: {{path: {base}, served_name: base}}\n"
        "adapters: [" + ", ".join(f"{{name: {n}, path: {p}}}" for n, p in adapters.items()) + "]\n"
        f"vllm: {{dtype: float32, max_model_len: 512, kv_cache_memory_bytes: 256M, max_loras: {len(adapters)},\n"
        f"       replicas: {replicas}, health_timeout: 600, runtime_lora_updating: false}}\n"
        "extra_args: [--enforce-eager]\n"
        f"gateway: {{host: 127.0.0.1, port: {port}}}\n"
        f"tenants: [{{name: bench, models: [{', '.join(names)}]}}]\n")
    key = subprocess.run([sys.executable, "-m", "pissa", "tenants", "add-key", str(root / "serve.yaml"), "bench"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    out = root / "pissa-serve.out"
    env = {**os.environ, "PISSA_GATEWAY_INTERNAL_KEY": INTERNAL, "PYTHONPATH": str(ROOT)}
    with open(out, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "pissa", "serve", str(root / "serve.yaml"),
                                 "--log-file", str(root / "vllm.log")], stdout=f, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 900
    while "vLLM is up" not in out.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("pissa serve did not come up:\n" + out.read_text()[-3000:])
        time.sleep(1)
    text = out.read_text()
    urls = re.findall(r"replica \d: (http://127\.0\.0\.1:\d+) \(loopback\)", text) or \
        re.findall(r"vLLM listens on loopback only: (\S+)", text)
    router = re.findall(r"vllm-router: (http://127\.0\.0\.1:\d+)", text)
    return proc, f"http://127.0.0.1:{port}", key, urls + router[:1]


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)



def added_latency(paths: dict, pairs: int) -> dict:
    """Latency of one 1-token base request along each path (``direct`` first), interleaved."""
    def once(c) -> float:
        t0 = time.perf_counter()
        c.completions.create(model="base", prompt=PROMPTS[1], max_tokens=1, temperature=0,
                             extra_headers={"X-Session-ID": "base"})
        return time.perf_counter() - t0

    for _ in range(5):
        for c in paths.values():
            once(c)
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(pairs):  # interleaved: drift of a shared machine hits every path alike
        for name, c in paths.items():
            times[name].append(once(c))
    row = {}
    for q in (50, 99):
        for name, ts in times.items():
            row[f"{name}_p{q}_ms"] = round(percentile(ts, q) * 1000, 2)
            if name != "direct":
                row[f"{name}_added_p{q}_ms"] = round((percentile(ts, q) - percentile(times["direct"], q)) * 1000, 2)
    return row


def served_counts(urls: list[str]) -> list[int]:
    """Requests each replica has finished (its ``vllm:request_success_total``)."""
    import httpx

    out = []
    for u in urls:
        text = httpx.get(u + "/metrics", timeout=30).text
        out.append(round(sum(float(v) for v in re.findall(r"^vllm:request_success_total\{[^}]*\} (\S+)", text, re.M))))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=60)
    ap.add_argument("--out", default=str(ROOT / "bench" / "replicas-results.json"))
    args = ap.parse_args(argv)

    from openai import OpenAI

    from serving.testing import make_peft_adapter

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import make_tiny_model

    work = Path(tempfile.mkdtemp(prefix="pissa-bench-replicas-"))
    base = str(make_tiny_model(work / "base"))
    adapters = {f"t{k}": str(make_peft_adapter(base, work / f"t{k}", seed=600 + k)) for k in range(3)}
    models = ["base", *adapters]
    record: dict = {"requests": args.requests, "max_tokens": args.max_tokens, "repeats": args.repeats,
                    "cpus": os.cpu_count(), "throughput": {}}
    for replicas in (1, 2):
        proc, url, key, urls = start(work, base, adapters, replicas)
        try:
            client = OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=600)
            vllms = urls[:replicas]
            run_scenario(client, models, 8, 4)  # warm-up
            before = served_counts(vllms)
            runs = [run_scenario(client, models, args.requests, args.max_tokens) for _ in range(args.repeats)]
            best = sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]
            best["tokens_per_s_all_repeats"] = [r["tokens_per_s"] for r in runs]
            best["requests_per_replica"] = [a - b for a, b in zip(served_counts(vllms), before)]
            record["throughput"][f"{replicas} replica{'s' if replicas > 1 else ''}"] = best
            if replicas == 2:
                def oa(u: str, k: str):
                    return OpenAI(base_url=u + "/v1", api_key=k, max_retries=0, timeout=600)

                paths = {"direct": oa(vllms[0], INTERNAL), "router": oa(urls[2], INTERNAL), "gateway_router": client}
                record["added_latency"] = {"pairs": args.pairs, **added_latency(paths, args.pairs)}
        finally:
            stop(proc)
    t = record["throughput"]
    record["ratio_2_to_1"] = round(t["2 replicas"]["tokens_per_s"] / t["1 replica"]["tokens_per_s"], 3)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"| deployment | tokens/s | requests/s | p50 s | p95 s | requests per replica |  ({args.requests} concurrent × "
          f"{args.max_tokens} tokens, {os.cpu_count()} CPUs)")
    print("|---|---:|---:|---:|---:|---|")
    for label, r in t.items():
        print(f"| {label} | {r['tokens_per_s']} | {r['requests_per_s']} | {r['p50_s']} | {r['p95_s']} | "
              f"{r['requests_per_replica']} |")
    print(f"2 replicas / 1: {record['ratio_2_to_1']}")
    a = record["added_latency"]
    for name in ("router", "gateway_router"):
        print(f"{name} over direct vLLM ({a['pairs']} interleaved rounds, 1 token): p50 +{a[name + '_added_p50_ms']} ms "
              f"({a['direct_p50_ms']} → {a[name + '_p50_ms']}), p99 +{a[name + '_added_p99_ms']} ms "
              f"({a['direct_p99_ms']} → {a[name + '_p99_ms']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
