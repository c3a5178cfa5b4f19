"""Two CPU replicas of the tiny Llama behind vllm-router and the gateway, started as a user would:
``pissa serve MANIFEST`` with ``vllm.replicas: 2`` and a ``tenants:`` section. One deployment for the
whole module (start-up is most of its time).

- Every answer through gateway + router equals the answer of one replica asked directly (greedy token
  ids; each replica is the single server ``pissa serve`` runs without replicas), streaming too.
- Affinity: each model's requests, counted on each replica's own ``vllm:request_success_total``, land on
  one replica (share >= 95 %).
- A runtime adapter is loaded on both replicas (``pissa adapters add`` prints each), and later removed
  from both.
- SIGKILL of one replica's vLLM under 32 concurrent clients: no non-streaming request lost, no wrong
  answer, streams either complete and right or end with the OpenAI error; the replica is restarted,
  rejoins, and serves the runtime adapter again.
- SIGINT stops everything; no process is left.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import openai
import pytest
from procs import alive, children, descendants, free_port, start_pissa_serve

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ADMIN, INTERNAL = "test-admin-key", "test-internal-key"
PROMPTS = ["The capital of France is", "def add(a, b):", "Hello world", "The quick brown fox"]
expected: dict[tuple[str, str], tuple[int, ...]] = {}  # (model, prompt) -> token ids from one replica directly


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_llama) -> dict[str, Path]:
    from serving.testing import make_peft_adapter

    root = tmp_path_factory.mktemp("adapters")
    return {n: make_peft_adapter(tiny_llama, root / n, seed=900 + i) for i, n in enumerate(("a1", "a2", "late"))}


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_llama, adapters):
    root = tmp_path_factory.mktemp("replicas")
    port = free_port()
    (root / "serve.yaml").write_text(
        f"base: {{path: {tiny_llama}, served_name: base}}\n"
        f"adapters: [{{name: a1, path: {adapters['a1']}}}, {{name: a2, path: {adapters['a2']}}}]\n"
        "vllm: {dtype: float32, max_model_len: 256, kv_cache_memory_bytes: 64M, max_loras: 3, max_cpu_loras: 4,\n"
        "       max_lora_rank: 8, health_timeout: 300, api_key_env: PISSA_ADMIN_KEY, replicas: 2}\n"
        "extra_args: [--enforce-eager]\n"
        f"gateway: {{host: 127.0.0.1, port: {port}}}\n"
        "tenants: [{name: acme, models: [a1, a2, base]}]\n")
    key = subprocess.run([sys.executable, "-m", "pissa", "tenants", "add-key", str(root / "serve.yaml"), "acme"],
                         capture_output=True, text=True, check=True).stdout.strip()
    env = {**os.environ, "PISSA_ADMIN_KEY": ADMIN, "PISSA_GATEWAY_INTERNAL_KEY": INTERNAL}
    out = root / "pissa-serve.out"
    proc = start_pissa_serve([str(root / "serve.yaml"), "--log-file", str(root / "vllm.log")], out, timeout=400, env=env)
    replicas = re.findall(r"replica \d: (http://127\.0\.0\.1:\d+) \(loopback\)", out.read_text())
    assert len(replicas) == 2, out.read_text()
    yield {"root": root, "url": f"http://127.0.0.1:{port}", "port": port, "key": key, "replicas": replicas,
           "proc": proc, "out": out, "env": env}
    if proc.poll() is None:
        spawned = descendants(proc.pid)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0, out.read_text()[-2000:]
        time.sleep(0.5)
        assert "stopped (SIGINT)" in out.read_text()
        assert not [p for p in spawned if alive(p)], "processes left behind"


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def ids(c: openai.OpenAI, model: str, prompt: str, *, stream: bool = False) -> tuple[int, ...]:
    kwargs = dict(model=model, prompt=prompt, max_tokens=8, temperature=0, extra_body={"return_token_ids": True})
    if stream:
        out: list[int] = []
        for chunk in c.completions.create(stream=True, **kwargs):
            if chunk.choices:
                out += chunk.choices[0].model_extra.get("token_ids") or []
        return tuple(out)
    return tuple(c.completions.create(**kwargs).choices[0].model_extra["token_ids"])


def served_here(url: str) -> int:
    """Requests this replica finished (its own Prometheus counter)."""
    text = httpx.get(url + "/metrics", timeout=30).text
    return round(sum(float(v) for v in re.findall(r"^vllm:request_success_total\{[^}]*\} (\S+)", text, re.M)))


def models_of(url: str) -> set[str]:
    r = httpx.get(url + "/v1/models", headers={"authorization": f"Bearer {INTERNAL}"}, timeout=30)
    return {m["id"] for m in r.json()["data"]}


def test_answers_equal_a_single_server(served):
    gw = client(served["url"], served["key"])
    for i, direct_url in enumerate(served["replicas"]):
        direct = client(direct_url, INTERNAL)
        for model in ("a1", "a2", "base"):
            for prompt in PROMPTS:
                want = ids(direct, model, prompt)
                if i == 0:
                    expected[(model, prompt)] = want
                assert want == expected[(model, prompt)], "the two replicas disagree"
    for (model, prompt), want in expected.items():
        assert ids(gw, model, prompt) == want, (model, prompt)
        assert ids(gw, model, prompt, stream=True) == want, (model, prompt)
    assert expected[("a1", PROMPTS[0])] != expected[("base", PROMPTS[0])]  # the adapter matters


def test_each_adapter_stays_on_one_replica(served):
    gw = client(served["url"], served["key"])
    shares = {}
    for model in ("a1", "a2", "base"):
        before = [served_here(u) for u in served["replicas"]]
        for i in range(20):
            gw.completions.create(model=model, prompt=PROMPTS[i % 4], max_tokens=2, temperature=0)
        counts = [served_here(u) - b for u, b in zip(served["replicas"], before)]
        assert sum(counts) == 20, counts
        shares[model] = (max(counts) / 20, counts)
    print("per-model requests on each replica:", {m: c for m, (_, c) in shares.items()})
    assert all(share >= 0.95 for share, _ in shares.values()), shares


def test_runtime_adapter_loads_on_both(served, adapters):
    out = subprocess.run([sys.executable, "-m", "pissa", "adapters", "add", "late", str(adapters["late"]),
                          "--url", served["url"], "--api-key-env", "PISSA_ADMIN_KEY", "--tenant", "acme"],
                         capture_output=True, text=True, env=served["env"])
    assert out.returncode == 0, out.stderr
    for url in served["replicas"]:
        assert f"replica {url}: 200" in out.stdout, out.stdout
        assert "late" in models_of(url)
    want = ids(client(served["replicas"][0], INTERNAL), "late", PROMPTS[0])
    assert want == ids(client(served["replicas"][1], INTERNAL), "late", PROMPTS[0])
    assert ids(client(served["url"], served["key"]), "late", PROMPTS[0]) == want
    expected[("late", PROMPTS[0])] = want


def _vllm_pid(proc: subprocess.Popen, url: str) -> int:
    port = url.rsplit(":", 1)[1]
    pids = [p for p, cmd in children(proc.pid).items() if "api_server" in cmd and f"--port {port} " in cmd]
    assert len(pids) == 1, children(proc.pid)
    return pids[0]


def test_sigkill_one_replica_under_load(served):
    # the replica that serves a2 (and, by the hash, maybe more) is killed
    before = [served_here(u) for u in served["replicas"]]
    client(served["url"], served["key"]).completions.create(model="a2", prompt="x", max_tokens=1)
    victim = max(range(2), key=lambda i: served_here(served["replicas"][i]) - before[i])
    victim_url = served["replicas"][victim]
    pid = _vllm_pid(served["proc"], victim_url)
    work = [(m, p) for m in ("a1", "a2", "base", "late") for p in PROMPTS if (m, p) in expected]
    results: Counter[str] = Counter()
    wrong: list[tuple] = []
    lock = threading.Lock()
    started = threading.Barrier(33)
    finished: list[float] = []

    def one_client(n: int) -> None:
        gw = client(served["url"], served["key"])
        started.wait()
        for k in range(6):
            model, prompt = work[(n + k) % len(work)]
            stream = (n + k) % 4 == 0
            try:
                got = ids(gw, model, prompt, stream=stream)
                outcome = "ok" if got == expected[(model, prompt)] else "wrong"
                if outcome == "wrong":
                    wrong.append((model, prompt, stream, got))
            except openai.APIError as exc:  # only a stream already under way may end this way
                outcome = "stream error" if stream else f"LOST {type(exc).__name__}: {exc}"
            with lock:
                finished.append(time.monotonic())
                results[outcome if outcome.startswith(("ok", "wrong", "stream")) else "lost"] += 1
                if outcome.startswith("LOST"):
                    results[outcome[:200]] += 1

    threads = [threading.Thread(target=one_client, args=(n,)) for n in range(32)]
    for t in threads:
        t.start()
    started.wait()
    time.sleep(1.0)
    os.kill(pid, signal.SIGKILL)
    t_kill = time.monotonic()
    for t in threads:
        t.join(timeout=300)
    after = sum(t > t_kill for t in finished)
    print(f"32 clients x 6 requests, replica {victim + 1} SIGKILLed 1 s in: {dict(results)}; {after} finished "
          f"after the kill, the last {max(finished) - t_kill:.1f} s after it")
    assert after >= 32  # the kill hit a loaded system, not an idle one
    assert results["lost"] == 0 and not wrong, (results, wrong)
    assert results["ok"] + results["stream error"] == 192
    # restarted, healthy again, with the runtime adapter, and routed to again
    deadline = time.monotonic() + 240
    pattern = f"replica {victim + 1} is healthy"
    while pattern not in served["out"].read_text():
        assert time.monotonic() < deadline, served["out"].read_text()[-3000:]
        time.sleep(1)
    print(f"replica {victim + 1} healthy again {time.monotonic() - t_kill:.0f} s after the kill")
    assert "late" in models_of(victim_url)
    assert ids(client(victim_url, INTERNAL), "late", PROMPTS[0]) == expected[("late", PROMPTS[0])]
    time.sleep(2)  # the router's health check (1 s) lets it back in
    before = served_here(victim_url)
    for prompt in PROMPTS:
        assert ids(client(served["url"], served["key"]), "a2", prompt) == expected[("a2", prompt)]
    assert served_here(victim_url) - before == len(PROMPTS)  # a2 is back on its replica


def test_runtime_adapter_removed_from_both(served):
    out = subprocess.run([sys.executable, "-m", "pissa", "adapters", "remove", "late", "--url", served["url"],
                          "--api-key-env", "PISSA_ADMIN_KEY"], capture_output=True, text=True, env=served["env"])
    assert out.returncode == 0, out.stderr
    for url in served["replicas"]:
        assert f"replica {url}: 200" in out.stdout, out.stdout
        assert "late" not in models_of(url)
    with pytest.raises(openai.NotFoundError):
        client(served["url"], served["key"]).completions.create(model="late", prompt="x", max_tokens=1)
