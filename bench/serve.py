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

``--gateway``: the tenant gateway's overhead instead (``serving.gateway``, as ``pissa serve`` runs it with
``tenants:``, one tenant allowed every served model). The same requests go one at a time to the model
server directly and through a gateway in front of that same server, in alternating order, ``--repeats``
rounds of ``--gateway-requests`` pairs after a warm-up: non-streaming latency, and time to the first token
of a stream (the first ``data: {...}`` event). Reported: p50 and p99 direct and through the gateway, the
difference of those percentiles (the overhead), and the median of the per-pair differences. ``--upstream``
chooses the server behind: ``vllm`` (the bench's vLLM), ``fake`` (the tests' stand-in vLLM,
``tests/fake_vllm.py``, no delay: the gateway's own cost without vLLM's noise) or ``both``. Goal: p50
overhead under 2 ms. Results go to ``--out`` (default ``bench/serve-gateway-results.json``).

    python bench/serve.py --gateway --upstream both --max-tokens 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
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


@contextlib.contextmanager
def gateway_in_front(upstream: str, upstream_key: str | None, models: list[str], work: Path) -> Iterator[tuple[str, str]]:
    """A gateway (uvicorn thread, as in ``pissa serve``) in front of ``upstream``; yields its URL and a tenant key."""
    from serving.gateway import keys
    from serving.gateway.app import Gateway
    from serving.gateway.config import GatewayConfig, Limits, Tenant
    from serving.gateway.server import GatewayServer, bind

    config = GatewayConfig("127.0.0.1", 0, work / "tenants.keys", work / "usage.sqlite",
                           (Tenant("bench", tuple(models), Limits()),))
    key, _ = keys.add_key(config.keys_file, "bench")
    server = GatewayServer(Gateway(config, upstream=upstream, upstream_key=upstream_key, admin_key=None),
                           bind("127.0.0.1", 0))
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}", key
    finally:
        server.stop()


def timed_request(client, body: dict, stream: bool) -> float:
    """Seconds to the whole answer, or (``stream``) to the first token event; the stream is read to its end."""
    t0 = time.perf_counter()
    if not stream:
        r = client.post("/v1/completions", json=body)
        elapsed = time.perf_counter() - t0
        if r.status_code != 200:
            raise RuntimeError(f"{client.base_url}: {r.status_code} {r.text[:200]}")
        return elapsed
    first = None
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{client.base_url}: {r.status_code} {r.read()[:200]!r}")
        for line in r.iter_lines():
            if first is None and line.startswith("data: {"):
                first = time.perf_counter() - t0
    if first is None:
        raise RuntimeError(f"{client.base_url}: a stream without a token")
    return first


def measure_overhead(direct_url: str, direct_key: str | None, gateway_url: str, gateway_key: str,
                     models: list[str], n: int, repeats: int, max_tokens: int) -> dict:
    """Paired sequential requests, direct and through the gateway in alternating order; see the module doc."""
    import httpx

    def client(url: str, key: str | None) -> httpx.Client:
        return httpx.Client(base_url=url, headers={"authorization": f"Bearer {key}"} if key else {}, timeout=600)

    out = {}
    with client(direct_url, direct_key) as direct, client(gateway_url, gateway_key) as gateway:
        for label, stream in (("latency", False), ("time to first token", True)):
            lat: dict[str, list[float]] = {"direct": [], "gateway": []}
            for k in range(8):  # warm-up: connections, compiled paths
                for c in (direct, gateway):
                    timed_request(c, {"model": models[k % len(models)], "prompt": PROMPTS[k % len(PROMPTS)],
                                      "max_tokens": max_tokens}, stream)
            for _ in range(repeats):
                for i in range(n):
                    body = {"model": models[i % len(models)], "prompt": PROMPTS[i % len(PROMPTS)],
                            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
                    order = (("direct", direct), ("gateway", gateway)) if i % 2 else \
                        (("gateway", gateway), ("direct", direct))
                    for name, c in order:
                        lat[name].append(timed_request(c, body, stream))
            d, g = lat["direct"], lat["gateway"]
            ms = lambda x: round(x * 1000, 3)  # noqa: E731
            out[label] = {"pairs": len(d), "direct_p50_ms": ms(statistics.median(d)),
                          "direct_p99_ms": ms(percentile(d, 99)), "gateway_p50_ms": ms(statistics.median(g)),
                          "gateway_p99_ms": ms(percentile(g, 99)),
                          "overhead_p50_ms": ms(statistics.median(g) - statistics.median(d)),
                          "overhead_p99_ms": ms(percentile(g, 99) - percentile(d, 99)),
                          "paired_difference_median_ms": ms(statistics.median(b - a for a, b in zip(d, g)))}
    return out


def gateway_main(args: argparse.Namespace, work: Path, vllm_plan) -> int:
    """``--gateway``: the overhead of the tenant gateway, against the stand-in and/or vLLM (see the module doc)."""
    results: dict[str, dict] = {}
    if args.upstream in ("fake", "both"):
        sys.path.insert(0, str(ROOT))
        from tests.fake_vllm import FakeVllm, ThreadServer

        fake = FakeVllm(key=None, delay=0.0)
        with ThreadServer(fake.app()) as upstream, \
                gateway_in_front(upstream.url, None, fake.models, work / "gw-fake") as (url, key):
            results["stand-in vLLM (tests/fake_vllm.py, in process, no delay)"] = measure_overhead(
                upstream.url, None, url, key, fake.models, args.gateway_requests, args.repeats, args.max_tokens)
    if args.upstream in ("vllm", "both"):
        from serving.launcher import VllmServer

        plan, models = vllm_plan()
        with VllmServer(plan, work / "vllm.log", health_timeout=300) as server, \
                gateway_in_front(server.plan.url, None, models, work / "gw-vllm") as (url, key):
            results["vLLM (tiny model, CPU)" if args.base is None else f"vLLM ({args.base})"] = measure_overhead(
                server.plan.url, None, url, key, models, args.gateway_requests, args.repeats, args.max_tokens)
    out = args.out if args.out != DEFAULT_OUT else str(ROOT / "bench" / "serve-gateway-results.json")
    Path(out).write_text(json.dumps({"max_tokens": args.max_tokens, "repeats": args.repeats,
                                     "pairs_per_repeat": args.gateway_requests, "results": results}, indent=2) + "\n")
    print(f"gateway overhead, sequential requests, max_tokens {args.max_tokens}, "
          f"{args.repeats} × {args.gateway_requests} pairs (ms)")
    print("| upstream | measure | direct p50 | gateway p50 | overhead p50 | direct p99 | gateway p99 | overhead p99 "
          "| median paired difference |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for upstream, measures in results.items():
        for label, r in measures.items():
            print(f"| {upstream} | {label} | {r['direct_p50_ms']} | {r['gateway_p50_ms']} | {r['overhead_p50_ms']} "
                  f"| {r['direct_p99_ms']} | {r['gateway_p99_ms']} | {r['overhead_p99_ms']} "
                  f"| {r['paired_difference_median_ms']} |")
    print(f"results: {out}")
    return 0


DEFAULT_OUT = str(ROOT / "bench" / "serve-results.json")


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
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--ops", default="fast",
                    help="comma list of the plugin's CPU LoRA ops to compare, one server each, in one run: "
                         "fast (serving/lora_ops.py and serving/lora_fused.py), fast-torch-gemm (the same with "
                         "torch's GEMMs instead of vLLM's oneDNN: PISSA_LORA_ONEDNN=0), fixed (the minimal index -1 "
                         "fix)")
    ap.add_argument("--adapters", type=int, default=4, help="random tenants to make (max_loras = this)")
    ap.add_argument("--gateway", action="store_true", help="measure the tenant gateway's overhead instead")
    ap.add_argument("--upstream", choices=["vllm", "fake", "both"], default="both",
                    help="--gateway: the server behind the gateway (fake: the tests' stand-in vLLM)")
    ap.add_argument("--gateway-requests", type=int, default=200, help="--gateway: request pairs per repeat")
    args = ap.parse_args(argv)

    from serving.launcher import plan_serving
    from serving.manifest import VllmSettings, manifest_from_flags, parse_size

    work = Path(tempfile.mkdtemp(prefix="pissa-bench-serve-"))

    def vllm_plan():
        """The launch plan (base + 4 adapters, KV cache sized by --kv-cache) and the adapters' names."""
        base = args.base
        if base is None:
            sys.path.insert(0, str(ROOT / "tests"))
            from tiny import make_tiny_model

            base = str(make_tiny_model(work / "base"))
        adapters = list(args.adapter)
        if not adapters:
            from serving.testing import make_peft_adapter

            adapters = [f"t{k}={make_peft_adapter(base, work / f't{k}', seed=500 + k)}" for k in range(args.adapters)]
        if len(adapters) < 4:
            ap.error("give at least 4 adapters (or none for random tenants)")
        settings = VllmSettings(port=args.port, dtype=args.dtype, max_loras=len(adapters), max_model_len=512,
                                kv_cache_memory_bytes=parse_size(args.kv_cache), runtime_lora_updating=False)
        manifest = manifest_from_flags(base, adapters, served_name="base", settings=settings,
                                       extra_args=("--enforce-eager",))
        return plan_serving(manifest), base, adapters, [a.name for a in manifest.adapters]

    if args.gateway:
        def plan_and_models():
            plan, _, _, names = vllm_plan()
            return plan, ["base", *names]

        return gateway_main(args, work, plan_and_models)

    import os

    from openai import OpenAI

    from serving.launcher import VllmServer

    plan, base, adapters, names = vllm_plan()
    scenarios = {"base": ["base"], "1 adapter": names[:1], "2 adapters": names[:2], "4 adapters": names[:4]}
    if len(names) > 4:
        scenarios[f"{len(names)} adapters"] = names
    scenarios["base + 4 adapters"] = ["base", *names[:4]]
    modes = [m.strip() for m in args.ops.split(",") if m.strip()]
    if not modes or any(m not in ("fast", "fast-torch-gemm", "fixed") for m in modes):
        ap.error("--ops takes fast, fast-torch-gemm and/or fixed (comma-separated)")
    by_mode: dict[str, dict] = {}
    onednn_env = os.environ.get("PISSA_LORA_ONEDNN")
    for mode in modes:  # one server per ops choice (the plugin reads its environment at start-up)
        os.environ["PISSA_CPU_LORA_OPS"] = mode.removesuffix("-torch-gemm")
        if mode == "fast-torch-gemm":
            os.environ["PISSA_LORA_ONEDNN"] = "0"
        elif onednn_env is None:
            os.environ.pop("PISSA_LORA_ONEDNN", None)
        else:
            os.environ["PISSA_LORA_ONEDNN"] = onednn_env
        results: dict[str, dict] = {}
        t0 = time.perf_counter()
        with VllmServer(plan, work / f"vllm-{mode}.log", health_timeout=300) as server:
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
        by_mode[mode] = {"startup_s": round(startup, 1), "scenarios": results, "ratio_4_adapters_to_base": round(ratio, 3)}
        print(f"\n[{mode} ops] | scenario | tokens/s | requests/s | p50 s | p95 s |  ({args.requests} concurrent "
              f"requests × {args.max_tokens} tokens, {args.dtype}, max_loras {len(names)})")
        print("|---|---|---:|---:|---:|---:|")
        for label, r in results.items():
            print(f"| {mode} | {label} | {r['tokens_per_s']} | {r['requests_per_s']} | {r['p50_s']} | {r['p95_s']} |")
        print(f"throughput ratio, 4 adapters mixed / base only ({mode} ops): {ratio:.2f}  (start-up {startup:.0f} s)")
    record = {"base": base, "adapters": adapters, "requests": args.requests, "max_tokens": args.max_tokens,
              "repeats": args.repeats, "dtype": args.dtype, "max_loras": len(names), "ops": by_mode,
              "command": "python bench/serve.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if len(modes) == 1:  # the layout earlier results used
        record |= by_mode[modes[0]]
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
