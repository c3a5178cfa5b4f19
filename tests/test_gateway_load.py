"""Load through the tenant gateway: 64 concurrent clients over 4 tenants, streaming mixed with
non-streaming, against the stand-in vLLM (tests/fake_vllm.py) with a small per-token delay.

Shown: no 5xx (every answer is a 200), no cross-tenant answer (every answer names the model its own
tenant asked for, and a tenant's ``/v1/models`` stays its own list under load), and the usage totals
in SQLite equal the sums of ``usage`` the clients received.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from pathlib import Path

import httpx

from serving.gateway import store
from tests.fake_vllm import FakeVllm
from tests.gateway_env import running

CLIENTS = 64
REQUESTS_PER_CLIENT = 8
TENANT_MODELS = {"acme": {"a1", "base"}, "beta": {"b1"}, "gamma": {"a2"}, "delta": {"a1"}}  # tests.gateway_env


async def one_client(url: str, tenant: str, key: str, seed: int, usage: Counter[tuple[str, str, str]],
                     problems: list[str]) -> int:
    """REQUESTS_PER_CLIENT requests of one tenant's client; usage received is added to ``usage``."""
    rng = random.Random(seed)
    models = sorted(TENANT_MODELS[tenant])
    done = 0
    async with httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {key}"}, timeout=30) as client:
        for _ in range(REQUESTS_PER_CLIENT):
            kind = rng.choice(["completion", "chat", "stream", "chat-stream", "models"])
            model = rng.choice(models)
            if kind == "models":
                r = await client.get("/v1/models")
                listed = {m["id"] for m in r.json()["data"]} if r.status_code == 200 else None
                if listed != TENANT_MODELS[tenant]:
                    problems.append(f"{tenant} /v1/models: {r.status_code} {listed}")
                done += 1
                continue
            words = " ".join(f"w{j}" for j in range(rng.randint(1, 12)))
            body: dict[str, object] = {"model": model, "max_tokens": rng.randint(1, 8)}
            chat = kind.startswith("chat")
            if chat:
                body["messages"] = [{"role": "user", "content": words}]
            else:
                body["prompt"] = words
            path = "/v1/chat/completions" if chat else "/v1/completions"
            if kind.endswith("stream"):
                body.update(stream=True, stream_options={"include_usage": True})
                async with client.stream("POST", path, json=body) as r:
                    lines = [line async for line in r.aiter_lines() if line] if r.status_code == 200 else []
                    status = r.status_code
                chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
                answered = {c["model"] for c in chunks}
                got = [c["usage"] for c in chunks if c.get("usage")]
                if status != 200 or lines[-1:] != ["data: [DONE]"] or len(got) != 1:
                    problems.append(f"{tenant} {kind}: {status}, {len(got)} usage chunks")
                    continue
                received = got[0]
            else:
                r = await client.post(path, json=body)
                if r.status_code != 200:
                    problems.append(f"{tenant} {kind}: {r.status_code} {r.text[:200]}")
                    continue
                answered, received = {r.json()["model"]}, r.json()["usage"]
            if answered != {model}:
                problems.append(f"{tenant} asked {model} and was answered by {answered}")
            usage[(tenant, model, "prompt")] += received["prompt_tokens"]
            usage[(tenant, model, "completion")] += received["completion_tokens"]
            usage[(tenant, model, "requests")] += 1
            done += 1
    return done


async def load(url: str, keys: dict[str, str]) -> tuple[Counter[tuple[str, str, str]], list[str], int]:
    usage: Counter[tuple[str, str, str]] = Counter()
    problems: list[str] = []
    tenants = sorted(TENANT_MODELS)
    done = await asyncio.gather(*(one_client(url, tenants[i % 4], keys[tenants[i % 4]], i, usage, problems)
                                  for i in range(CLIENTS)))
    return usage, problems, sum(done)


def test_64_concurrent_clients_over_4_tenants(tmp_path: Path) -> None:
    with running(tmp_path, fake=FakeVllm(delay=0.002)) as g:
        usage, problems, done = asyncio.run(load(g.url, g.keys))
        forwarded = Counter(json.loads(s["raw"])["model"] for s in g.fake.seen if s["raw"])
    assert problems == []
    assert done == CLIENTS * REQUESTS_PER_CLIENT
    assert sum(forwarded.values()) == sum(v for k, v in usage.items() if k[2] == "requests")
    rows = store.usage_rows(g.config.usage_db)  # written by now: stopping the gateway flushes usage
    in_db: Counter[tuple[str, str, str]] = Counter()
    for row in rows:
        in_db[(row.tenant, row.model, "prompt")] += row.prompt_tokens
        in_db[(row.tenant, row.model, "completion")] += row.completion_tokens
        in_db[(row.tenant, row.model, "requests")] += row.requests
    assert in_db == usage
    assert {row.tenant for row in rows} == set(TENANT_MODELS)
    assert all(row.model in TENANT_MODELS[row.tenant] for row in rows)
