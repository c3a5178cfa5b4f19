"""The tenant gateway in front of a real vLLM server, started as a user would: ``pissa serve MANIFEST``
with a ``tenants:`` section (tiny Llama, fp32, CPU), one ``openai`` client per tenant with its own key.

Direct answers come from the same vLLM on loopback (its internal key is fixed through
``PISSA_GATEWAY_INTERNAL_KEY`` for this test), so "same answer with and without the gateway" and the
time-to-first-token overhead are measured on one server in one run. Usage received by the clients is
summed per tenant and compared with ``usage_db`` after ``pissa serve`` stops; a second start shows the
totals and the runtime grant survive a restart. Both stops are SIGINT; nothing may be left running.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx
import openai
import pytest
from procs import alive, descendants, free_port, start_pissa_serve

from serving.gateway import keys, store

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ADMIN, INTERNAL = "test-admin-key", "test-internal-key"
PROMPTS = ["The capital of France is", "def add(a, b):", "Hello world", "The quick brown fox"]
received: dict[str, dict[str, int]] = defaultdict(lambda: {"prompt": 0, "completion": 0})


def manifest_text(base: Path, adapters: dict[str, Path], port: int) -> str:
    return (f"base:\n  path: {base}\n  served_name: base\nadapters:\n"
            + "".join(f"  - name: {n}\n    path: {p}\n" for n, p in adapters.items())
            + "vllm:\n  dtype: float32\n  max_model_len: 256\n  kv_cache_memory_bytes: 64M\n  max_loras: 2\n"
              "  max_cpu_loras: 4\n  max_lora_rank: 8\n  health_timeout: 240\n  api_key_env: PISSA_ADMIN_KEY\n"
            + "extra_args: [--enforce-eager]\n"
            + f"gateway: {{host: 127.0.0.1, port: {port}, access_log: access.jsonl}}\n"
            + "tenants:\n"
              "  - name: acme\n    models: [a1, base]\n"
              "  - name: beta\n    models: [b1]\n    limits: {max_tokens: 200, max_concurrent: 1}\n"
              "  - name: hammer\n    models: [a2]\n    limits: {requests_per_minute: 5}\n"
              "  - name: delta\n    models: [a2, base]\n")


def start(root: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PISSA_ADMIN_KEY": ADMIN, "PISSA_GATEWAY_INTERNAL_KEY": INTERNAL}
    proc = start_pissa_serve([str(root / "serve.yaml"), "--log-file", str(root / "vllm.log")],
                             root / "pissa-serve.out", timeout=300, env=env)
    direct = re.search(r"vLLM listens on loopback only: (\S+)", (root / "pissa-serve.out").read_text())
    assert direct, (root / "pissa-serve.out").read_text()
    return proc, direct.group(1)


def stop(proc: subprocess.Popen, root: Path, port: int) -> None:
    spawned = descendants(proc.pid)
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=60)
    text = (root / "pissa-serve.out").read_text()
    assert code == 0 and "stopped (SIGINT)" in text, text[-2000:]
    time.sleep(0.5)
    assert not [p for p in spawned if alive(p)], "processes left behind"
    with httpx.Client() as c, pytest.raises(httpx.ConnectError):  # the gateway's port is closed
        c.get(f"http://127.0.0.1:{port}/health")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_llama) -> dict[str, Path]:
    from serving.testing import make_peft_adapter

    root = tmp_path_factory.mktemp("adapters")
    return {n: make_peft_adapter(tiny_llama, root / n, seed=700 + i) for i, n in enumerate(("a1", "a2", "b1", "late"))}


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_llama, adapters):
    root = tmp_path_factory.mktemp("gateway")
    port = free_port()
    (root / "serve.yaml").write_text(manifest_text(tiny_llama, {k: v for k, v in adapters.items() if k != "late"}, port))
    tenant_keys = {}
    for tenant in ("acme", "beta", "hammer", "delta", "acme"):  # acme gets two keys: one is revoked later
        tenant_keys.setdefault(tenant, []).append(subprocess.run(
            [sys.executable, "-m", "pissa", "tenants", "add-key", str(root / "serve.yaml"), tenant],
            capture_output=True, text=True, check=True).stdout.strip())
    proc, direct = start(root)
    yield {"root": root, "url": f"http://127.0.0.1:{port}", "port": port, "direct": direct, "keys": tenant_keys,
           "proc": proc}
    if proc.poll() is None:
        stop(proc, root, port)


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def ids(c: openai.OpenAI, tenant: str | None, model: str, prompt: str, *, stream: bool = False,
        max_tokens: int = 8) -> tuple[int, ...]:
    """Greedy token ids; usage the client received is added to ``received[tenant]``."""
    kwargs = dict(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                  extra_body={"return_token_ids": True})
    out: list[int] = []
    if stream:
        for chunk in c.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
            if chunk.choices:
                out += chunk.choices[0].model_extra.get("token_ids") or []
            if chunk.usage and tenant:
                received[tenant]["prompt"] += chunk.usage.prompt_tokens
                received[tenant]["completion"] += chunk.usage.completion_tokens
        return tuple(out)
    r = c.completions.create(**kwargs)
    if tenant:
        received[tenant]["prompt"] += r.usage.prompt_tokens
        received[tenant]["completion"] += r.usage.completion_tokens
    return tuple(r.choices[0].model_extra["token_ids"])


def test_models_differ_per_tenant(served):
    names = {t: sorted(m.id for m in client(served["url"], ks[0]).models.list()) for t, ks in served["keys"].items()}
    assert names == {"acme": ["a1", "base"], "beta": ["b1"], "hammer": ["a2"], "delta": ["a2", "base"]}


def test_tenant_answers_equal_vllm_without_the_gateway(served):
    acme = client(served["url"], served["keys"]["acme"][0])
    direct = client(served["direct"], INTERNAL)
    for model in ("a1", "base"):
        for prompt in PROMPTS:
            expected = ids(direct, None, model, prompt)
            assert ids(acme, "acme", model, prompt) == expected, (model, prompt)
            assert ids(acme, "acme", model, prompt, stream=True) == expected, (model, prompt)
    assert ids(acme, "acme", "a1", PROMPTS[0]) != ids(acme, "acme", "base", PROMPTS[0])  # the adapter matters


def test_other_tenants_adapter_and_a_made_up_name_give_identical_404s(served):
    key = served["keys"]["acme"][0]
    bodies = []
    for model in ("b1", "zz"):  # same length, so the bodies can be compared byte for byte after the name
        r = httpx.post(served["url"] + "/v1/completions", headers={"authorization": f"Bearer {key}"},
                       json={"model": model, "prompt": "x", "max_tokens": 2}, timeout=30)
        assert r.status_code == 404
        bodies.append((r.content.replace(model.encode(), b"NAME"), sorted(r.headers.keys())))
    assert bodies[0] == bodies[1]
    with pytest.raises(openai.NotFoundError):
        client(served["url"], key).completions.create(model="b1", prompt="x", max_tokens=2)


def test_missing_wrong_and_revoked_keys_get_401(served):
    assert httpx.get(served["url"] + "/v1/models", timeout=30).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        client(served["url"], "wrong").models.list()
    second = served["keys"]["acme"][1]
    assert client(served["url"], second).models.list()
    kid = keys.key_id(second)
    subprocess.run([sys.executable, "-m", "pissa", "tenants", "revoke", str(served["root"] / "serve.yaml"), str(kid)],
                   check=True, capture_output=True)
    time.sleep(1.0)  # the promise: a running gateway sees it within a second
    with pytest.raises(openai.AuthenticationError):
        client(served["url"], second).models.list()
    assert client(served["url"], served["keys"]["acme"][0]).models.list()  # the other key still works


def test_streaming_time_to_first_token_overhead(served):
    acme = client(served["url"], served["keys"]["acme"][0])
    direct = client(served["direct"], INTERNAL)

    def ttft(c: openai.OpenAI) -> float:
        t0 = time.perf_counter()
        stream = c.completions.create(model="a1", prompt=PROMPTS[1], max_tokens=4, temperature=0, stream=True,
                                      stream_options={"include_usage": True})
        first = None
        for chunk in stream:
            if first is None and chunk.choices:
                first = time.perf_counter() - t0
            if chunk.usage:
                received["acme"]["prompt"] += chunk.usage.prompt_tokens if c is acme else 0
                received["acme"]["completion"] += chunk.usage.completion_tokens if c is acme else 0
        assert first is not None
        return first

    ttft(acme), ttft(direct)  # warm both paths
    through, straight = [], []
    for _ in range(12):  # interleaved: drift of a shared machine hits both alike
        through.append(ttft(acme))
        straight.append(ttft(direct))
    overhead = statistics.median(through) - statistics.median(straight)
    print(f"TTFT median: direct {statistics.median(straight) * 1000:.1f} ms, gateway "
          f"{statistics.median(through) * 1000:.1f} ms, overhead {overhead * 1000:.1f} ms")
    assert overhead < 0.050


def test_admin_paths_and_runtime_grant(served, adapters):
    beta_key = served["keys"]["beta"][0]
    with pytest.raises(openai.PermissionDeniedError):
        client(served["url"], beta_key).post("/load_lora_adapter", body={"lora_name": "x", "lora_path": "/x"},
                                             cast_to=object)
    assert httpx.get(served["url"] + "/metrics", headers={"authorization": f"Bearer {beta_key}"}).status_code == 403
    env = {**os.environ, "PISSA_ADMIN_KEY": ADMIN}
    r = subprocess.run([sys.executable, "-m", "pissa", "adapters", "add", "late", str(adapters["late"]),
                        "--url", served["url"], "--api-key-env", "PISSA_ADMIN_KEY", "--tenant", "beta"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "granted to beta" in r.stdout, r.stderr
    assert sorted(m.id for m in client(served["url"], beta_key).models.list()) == ["b1", "late"]
    assert "late" not in [m.id for m in client(served["url"], served["keys"]["acme"][0]).models.list()]
    assert ids(client(served["url"], beta_key), "beta", "late", PROMPTS[0])
    metrics = httpx.get(served["url"] + "/metrics", headers={"authorization": f"Bearer {ADMIN}"}).text
    assert 'pissa_gateway_requests_total{model="late",status="200",tenant="beta"}' in metrics


def test_limits_with_a_real_server(served):
    beta = client(served["url"], served["keys"]["beta"][0])
    with pytest.raises(openai.BadRequestError, match="cap of 200"):
        beta.completions.create(model="b1", prompt="x", max_tokens=201)
    # max_concurrent 1: while one stream is generating (200 tokens, EOS ignored), a second request is refused.
    # The tiny model streams its 200 tokens in well under a second, so on a loaded machine the stream can end
    # before the second request reaches the gateway (seen once in CI): then that request is served, counted,
    # and the pair is tried again; a gateway that never refuses fails all three tries.
    refused = 0
    for _ in range(3):
        stream = beta.completions.create(model="b1", prompt=PROMPTS[2], max_tokens=200, temperature=0, stream=True,
                                         stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        chunks = iter(stream)
        next(chunks)
        try:
            extra = beta.completions.create(model="b1", prompt="x", max_tokens=1)
        except openai.RateLimitError:
            refused += 1
        else:
            assert extra.usage is not None
            received["beta"]["prompt"] += extra.usage.prompt_tokens
            received["beta"]["completion"] += extra.usage.completion_tokens
        for chunk in chunks:
            if chunk.usage:
                received["beta"]["prompt"] += chunk.usage.prompt_tokens
                received["beta"]["completion"] += chunk.usage.completion_tokens
        if refused:
            break
    assert refused == 1
    assert ids(beta, "beta", "b1", PROMPTS[2], max_tokens=4)  # the slot is free again


def test_a_hammering_tenant_gets_429_and_others_are_served(served):
    hammer = client(served["url"], served["keys"]["hammer"][0])
    acme = client(served["url"], served["keys"]["acme"][0])

    def p50(n: int) -> float:
        lat = []
        for i in range(n):
            t0 = time.perf_counter()
            ids(acme, "acme", "a1", PROMPTS[i % len(PROMPTS)], max_tokens=4)
            lat.append(time.perf_counter() - t0)
        return statistics.median(lat)

    before = p50(8)
    codes: list[int] = []
    retry_after: list[str] = []
    stop_hammer = threading.Event()
    refused = threading.Event()  # set at the first 429: measure only while the hammer is being refused

    def hammering() -> None:
        with httpx.Client(timeout=60) as c:
            while not stop_hammer.is_set():
                r = c.post(served["url"] + "/v1/completions",
                           headers={"authorization": f"Bearer {served['keys']['hammer'][0]}"},
                           json={"model": "a2", "prompt": "x", "max_tokens": 1})
                codes.append(r.status_code)
                if r.status_code == 429:
                    refused.set()
                    retry_after.append(r.headers.get("retry-after", ""))
                    received_hammer = r.json()["error"]["type"]
                    assert received_hammer == "RateLimitError"
                elif r.status_code == 200:
                    u = r.json()["usage"]
                    received["hammer"]["prompt"] += u["prompt_tokens"]
                    received["hammer"]["completion"] += u["completion_tokens"]

    t = threading.Thread(target=hammering)
    t.start()
    try:
        # the hammer's client and first requests can take longer than the whole measurement on a loaded
        # machine (CI once measured before it had sent anything): wait for its first refusal
        assert refused.wait(timeout=60), f"no 429 within 60 s: {codes}"
        during = p50(8)
    finally:
        stop_hammer.set()
        t.join()
    print(f"acme p50 latency: {before * 1000:.1f} ms alone, {during * 1000:.1f} ms while hammer is refused "
          f"({codes.count(429)} x 429, {codes.count(200)} x 200)")
    assert codes.count(200) <= 5 and codes.count(429) > 0 and set(codes) <= {200, 429}
    assert all(v.isdigit() and 1 <= int(v) <= 60 for v in retry_after)
    assert during < 3 * before + 0.05  # loose: the refused requests never reach vLLM
    with pytest.raises(openai.RateLimitError):
        hammer.completions.create(model="a2", prompt="x", max_tokens=1)


def test_load_64_clients_over_4_tenants(served):
    """64 concurrent clients (16 per tenant, half streaming): no 5xx, every answer from a model of the
    caller's own list and the one it asked for; 429 only where a limit says so."""
    lists = {"acme": ["a1", "base"], "beta": ["b1"], "hammer": ["a2"], "delta": ["a2", "base"]}
    tenants = list(lists)
    outcomes: list[tuple[str, str, int, str | None]] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        tenant = tenants[i % 4]
        model = lists[tenant][(i // 4) % len(lists[tenant])]
        body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 4, "temperature": 0}
        if i % 2:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        headers = {"authorization": f"Bearer {served['keys'][tenant][0]}"}
        with httpx.Client(timeout=120) as c, c.stream("POST", served["url"] + "/v1/completions", json=body,
                                                      headers=headers) as r:
            text = r.read().decode()
        answered, usage = None, None
        if r.status_code == 200:
            events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")] \
                if i % 2 else [json.loads(text)]
            answered = {e["model"] for e in events}.pop()
            usage = next(e["usage"] for e in events if e.get("usage"))
        with lock:
            outcomes.append((tenant, model, r.status_code, answered))
            if usage:
                received[tenant]["prompt"] += usage["prompt_tokens"]
                received[tenant]["completion"] += usage["completion_tokens"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outcomes) == 64
    assert all(code < 500 for _, _, code, _ in outcomes)
    assert all(answered == model for _, model, code, answered in outcomes if code == 200)  # no cross-tenant answer
    assert all(code == 200 for tenant, _, code, _ in outcomes if tenant in ("acme", "delta"))
    assert {code for tenant, _, code, _ in outcomes if tenant in ("beta", "hammer")} <= {200, 429}


def test_usage_matches_clients_and_survives_a_restart(served):
    root, port = served["root"], served["port"]
    stop(served["proc"], root, port)
    rows = store.usage_rows(root / "usage.sqlite")
    totals: dict[str, dict[str, int]] = defaultdict(lambda: {"prompt": 0, "completion": 0})
    for r in rows:
        totals[r.tenant]["prompt"] += r.prompt_tokens
        totals[r.tenant]["completion"] += r.completion_tokens
    assert dict(totals) == dict(received)
    log_lines = (root / "access.jsonl").read_text().splitlines()
    assert log_lines and all(k not in (root / "access.jsonl").read_text() for ks in served["keys"].values() for k in ks)
    assert "The capital of France" not in (root / "access.jsonl").read_text()
    proc, _ = start(root)  # a second start: the totals and the runtime grant are still there
    try:
        table = subprocess.run([sys.executable, "-m", "pissa", "tenants", "usage", str(root / "serve.yaml")],
                               capture_output=True, text=True, check=True).stdout
        acme_total = sum(int(line.split()[6]) for line in table.splitlines()[1:] if line.split()[1] == "acme")
        assert acme_total == received["acme"]["prompt"] + received["acme"]["completion"]
        beta = client(f"http://127.0.0.1:{port}", served["keys"]["beta"][0])
        assert sorted(m.id for m in beta.models.list()) == ["b1", "late"]
    finally:
        stop(proc, root, port)
