"""The tenant gateway against a stand-in vLLM (tests/fake_vllm.py): keys, allow-lists, limits, usage,
streaming, admin paths, through the ``openai`` client where a client would use it."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from serving.gateway import keys, store
from serving.gateway.config import Limits
from tests.fake_vllm import FakeVllm
from tests.gateway_env import ADMIN_KEY, config, running


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


def test_models_are_per_tenant_and_other_tenants_models_look_missing(tmp_path: Path) -> None:
    with running(tmp_path) as g:
        acme, beta = client(g.url, g.keys["acme"]), client(g.url, g.keys["beta"])
        assert sorted(m.id for m in acme.models.list()) == ["a1", "base"]
        assert [m.id for m in beta.models.list()] == ["b1"]
        admin = httpx.get(g.url + "/v1/models", headers={"authorization": f"Bearer {ADMIN_KEY}"})
        assert sorted(m["id"] for m in admin.json()["data"]) == ["a1", "a2", "b1", "base"]
        # acme asking for beta's adapter and for a made-up name: identical 404 bodies
        bodies = []
        for model in ("b1", "no-such-model"):
            r = httpx.post(g.url + "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2},
                           headers={"authorization": f"Bearer {g.keys['acme']}"})
            assert r.status_code == 404
            bodies.append(r.text.replace(model, "NAME"))
        assert bodies[0] == bodies[1]
        with pytest.raises(openai.NotFoundError):
            acme.completions.create(model="b1", prompt="hi", max_tokens=2)
        assert all(json.loads(s["raw"] or b"{}").get("model") != "b1" for s in g.fake.seen)  # never forwarded


def test_keys_401_and_revocation_on_a_running_gateway(tmp_path: Path) -> None:
    with running(tmp_path) as g:
        for key in ("wrong", "pissa-00000000-" + "x" * 43, g.keys["acme"] + "x"):
            with pytest.raises(openai.AuthenticationError):
                client(g.url, key).models.list()
        r = httpx.get(g.url + "/v1/models")  # no Authorization header at all
        assert r.status_code == 401 and r.json()["error"]["code"] == 401
        acme = client(g.url, g.keys["acme"])
        assert acme.completions.create(model="a1", prompt="hi", max_tokens=2).choices[0].text == "tok0 tok1"
        kid = keys.key_id(g.keys["acme"])
        assert kid is not None
        keys.revoke_key(g.config.keys_file, kid)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                acme.models.list()
            except openai.AuthenticationError:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the revoked key still worked after 1 s")
        new_key, _ = keys.add_key(g.config.keys_file, "acme")  # and a new key works without a restart
        time.sleep(keys.RELOAD_INTERVAL + 0.1)
        assert [m.id for m in client(g.url, new_key).models.list()]


def test_requests_are_forwarded_unchanged_with_the_internal_key_only(tmp_path: Path) -> None:
    with running(tmp_path) as g:
        raw = b'{"model": "a1",  "prompt": "one two", "max_tokens": 3, "temperature": 0}'
        r = httpx.post(g.url + "/v1/completions?debug=1", content=raw,
                       headers={"authorization": f"Bearer {g.keys['acme']}", "content-type": "application/json",
                                "x-forwarded-for": "1.2.3.4", "cookie": "c=1"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        seen = g.fake.seen[-1]
        assert seen["raw"] == raw and seen["path"] == "/v1/completions"
        assert seen["headers"]["authorization"] == "Bearer internal"
        assert not {"cookie", "x-forwarded-for"} & set(seen["headers"])
        assert g.keys["acme"] not in json.dumps({k: v for k, v in seen["headers"].items()})


def test_admin_paths(tmp_path: Path) -> None:
    with running(tmp_path) as g:
        for path in ("/load_lora_adapter", "/unload_lora_adapter"):
            with pytest.raises(openai.PermissionDeniedError):
                client(g.url, g.keys["acme"]).post(path, body={"lora_name": "x", "lora_path": "/x"}, cast_to=object)
        assert httpx.get(g.url + "/metrics", headers={"authorization": f"Bearer {g.keys['acme']}"}).status_code == 403
        assert httpx.get(g.url + "/metrics").status_code == 401
        admin = {"authorization": f"Bearer {ADMIN_KEY}"}
        r = httpx.post(g.url + "/v1/load_lora_adapter", headers=admin,
                       json={"lora_name": "new", "lora_path": "/adapters/new", "tenants": ["beta", "gamma"]})
        assert r.status_code == 200 and r.headers["x-pissa-granted"] == "beta,gamma"
        assert "tenants" not in json.loads(g.fake.seen[-1]["raw"])  # the gateway's own field is not forwarded
        assert "new" in [m.id for m in client(g.url, g.keys["beta"]).models.list()]
        assert "new" not in [m.id for m in client(g.url, g.keys["acme"]).models.list()]
        assert store.runtime_adapters(g.config.usage_db) == {"new": "/adapters/new"}
        bad = httpx.post(g.url + "/v1/load_lora_adapter", headers=admin,
                         json={"lora_name": "n2", "lora_path": "/x", "tenants": ["nobody"]})
        assert bad.status_code == 400
        seen = len(g.fake.seen)
        for name in ("x=y", "a,b", "my adapter"):  # vLLM's --lora-modules at the next start could not take them
            refused = httpx.post(g.url + "/v1/load_lora_adapter", headers=admin, json={"lora_name": name, "lora_path": "/x"})
            assert refused.status_code == 400 and "lora_name" in refused.text
        assert len(g.fake.seen) == seen and "x=y" not in store.runtime_adapters(g.config.usage_db)
        # removing a manifest adapter takes it off every list
        assert httpx.post(g.url + "/v1/unload_lora_adapter", headers=admin, json={"lora_name": "a1"}).status_code == 200
        assert [m.id for m in client(g.url, g.keys["acme"]).models.list()] == ["base"]
        assert httpx.post(g.url + "/v1/unload_lora_adapter", headers=admin, json={"lora_name": "new"}).status_code == 200
        assert store.runtime_adapters(g.config.usage_db) == {} and store.grants(g.config.usage_db) == {}
        metrics = httpx.get(g.url + "/metrics", headers=admin)
        assert metrics.status_code == 200 and 'pissa_gateway_requests_total{model="-",status="403",tenant="acme"}' in metrics.text


def test_admin_paths_closed_without_an_admin_key(tmp_path: Path) -> None:
    with running(tmp_path, admin_key=None) as g:
        r = httpx.post(g.url + "/v1/load_lora_adapter", json={"lora_name": "n", "lora_path": "/x"},
                       headers={"authorization": "Bearer x"})
        assert r.status_code == 401
        assert httpx.get(g.url + "/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"}).status_code == 401


def test_runtime_grants_survive_a_restart(tmp_path: Path) -> None:
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    with running(tmp_path) as g:
        r = httpx.post(g.url + "/v1/load_lora_adapter", headers=admin,
                       json={"lora_name": "late", "lora_path": "/adapters/late", "tenants": ["acme"]})
        assert r.status_code == 200
    fake = FakeVllm(models=["base", "a1", "a2", "b1", "late"])  # the restarted vLLM serves it again
    with running(tmp_path, fake=fake) as g:
        assert sorted(m.id for m in client(g.url, g.keys["acme"]).models.list()) == ["a1", "base", "late"]


def test_streaming_relays_event_by_event_and_counts_usage_exactly(tmp_path: Path) -> None:
    fake = FakeVllm(delay=0.2)
    with running(tmp_path, fake=fake) as g:
        acme = client(g.url, g.keys["acme"])
        t0 = time.perf_counter()
        stream = acme.completions.create(model="a1", prompt="a b c", max_tokens=5, stream=True)
        first = next(iter(stream))
        first_at = time.perf_counter() - t0
        rest = list(stream)
        total = time.perf_counter() - t0
        assert first.choices[0].text == "tok0 " and len(rest) == 4  # no usage chunk: the client did not ask
        assert first_at < total - 0.5  # the first token came long before the stream ended (not buffered)
        upstream_body = json.loads(g.fake.seen[-1]["raw"])
        assert upstream_body["stream_options"] == {"include_usage": True}
        asked = list(acme.chat.completions.create(model="base", messages=[{"role": "user", "content": "x y"}],
                                                  max_tokens=3, stream=True, stream_options={"include_usage": True}))
        assert asked[-1].usage is not None and asked[-1].usage.completion_tokens == 3
        plain = acme.completions.create(model="a1", prompt="a b c", max_tokens=5)
    rows = store.usage_rows(g.config.usage_db, tenant="acme")
    assert sum(r.prompt_tokens for r in rows) == 3 + 2 + plain.usage.prompt_tokens
    assert sum(r.completion_tokens for r in rows) == 5 + 3 + 5
    assert sum(r.requests for r in rows) == 3


def test_client_disconnect_cancels_the_upstream_stream(tmp_path: Path) -> None:
    fake = FakeVllm(delay=0.3)
    with running(tmp_path, fake=fake) as g:
        with httpx.stream("POST", g.url + "/v1/completions", headers={"authorization": f"Bearer {g.keys['acme']}"},
                          json={"model": "a1", "prompt": "p", "max_tokens": 50, "stream": True}) as r:
            for _ in r.iter_raw():
                break  # leave after the first event
        deadline = time.monotonic() + 5
        while not fake.cancelled and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fake.cancelled == ["a1"]
        assert g.gateway.admission.active["acme"] == 0
    rows = store.usage_rows(g.config.usage_db, tenant="acme")  # what was streamed still counts
    assert [(r.prompt_tokens, r.completion_tokens) for r in rows] == [(0, 1)]


def test_limits(tmp_path: Path) -> None:
    cfg = config(tmp_path, acme=Limits(requests_per_minute=3, max_tokens=8),
                 gamma=Limits(max_concurrent=2), delta=Limits(tokens_per_day=20))
    with running(tmp_path, fake=FakeVllm(delay=0.3), cfg=cfg) as g:
        acme, beta = client(g.url, g.keys["acme"]), client(g.url, g.keys["beta"])
        for _ in range(3):
            acme.completions.create(model="a1", prompt="p", max_tokens=1)
        with pytest.raises(openai.RateLimitError) as exc:
            acme.completions.create(model="a1", prompt="p", max_tokens=1)
        assert 1 <= int(exc.value.response.headers["retry-after"]) <= 60
        assert beta.completions.create(model="b1", prompt="p", max_tokens=1).choices  # others unaffected
        # max_tokens: above the cap -> 400 naming it; absent -> the cap is set
        r = httpx.post(g.url + "/v1/completions", headers={"authorization": f"Bearer {g.keys['acme']}"},
                       json={"model": "a1", "prompt": "p", "max_tokens": 9})
        assert r.status_code in (400, 429)
        # (a fresh tenant to see the cap without the rate limit)
    cfg = config(tmp_path / "2", acme=Limits(max_tokens=8))
    with running(tmp_path / "2", cfg=cfg) as g:
        r = httpx.post(g.url + "/v1/completions", headers={"authorization": f"Bearer {g.keys['acme']}"},
                       json={"model": "a1", "prompt": "p", "max_tokens": 9})
        assert r.status_code == 400 and "cap of 8" in r.json()["error"]["message"]
        r = httpx.post(g.url + "/v1/completions", headers={"authorization": f"Bearer {g.keys['acme']}"},
                       json={"model": "a1", "prompt": "p"})
        assert r.status_code == 200 and json.loads(g.fake.seen[-1]["raw"])["max_tokens"] == 8
    with running(tmp_path / "3", fake=FakeVllm(delay=0.3), cfg=cfg_concurrency(tmp_path / "3")) as g:
        gamma = client(g.url, g.keys["gamma"])
        results: list[object] = []

        def call() -> None:
            try:
                results.append(gamma.completions.create(model="a2", prompt="p", max_tokens=4))
            except openai.RateLimitError as e:
                results.append(e)

        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        refused = [r for r in results if isinstance(r, openai.RateLimitError)]
        assert len(refused) == 2 and len(results) == 4
        delta = client(g.url, g.keys["delta"])
        delta.completions.create(model="a1", prompt="one two three", max_tokens=10)  # 13 tokens
        delta.completions.create(model="a1", prompt="one two three", max_tokens=10)  # 26 >= 20
        with pytest.raises(openai.RateLimitError) as exc:
            delta.completions.create(model="a1", prompt="p", max_tokens=1)
        assert int(exc.value.response.headers["retry-after"]) >= 1


def test_a_finished_stream_frees_its_slot_before_the_client_sees_the_end(tmp_path: Path) -> None:
    """max_concurrent 1: a client that reads a stream to ``[DONE]`` and sends its next request at once is
    served, even while vLLM's response body is still open (CI saw a 429 there with a real server)."""
    cfg = config(tmp_path, gamma=Limits(max_concurrent=1))
    with running(tmp_path, fake=FakeVllm(linger=2.0), cfg=cfg) as g:
        gamma = client(g.url, g.keys["gamma"])
        headers = {"authorization": f"Bearer {g.keys['gamma']}"}
        body = {"model": "a2", "prompt": "p", "max_tokens": 3, "stream": True}
        with httpx.Client(timeout=30) as c:
            for _ in range(2):  # read up to [DONE], leave the body open, ask again
                with c.stream("POST", g.url + "/v1/completions", json=body, headers=headers) as r:
                    lines = []
                    for line in r.iter_lines():
                        lines.append(line)
                        if line == "data: [DONE]":
                            break
                    assert len([x for x in lines if x.startswith("data: {")]) == 3
                    assert gamma.completions.create(model="a2", prompt="p", max_tokens=1).choices[0].text == "tok0"
        assert g.gateway.admission.active["gamma"] == 0
    rows = store.usage_rows(g.config.usage_db, tenant="gamma")
    assert sum(r.completion_tokens for r in rows) == 8


def cfg_concurrency(tmp: Path):
    return config(tmp, gamma=Limits(max_concurrent=2), delta=Limits(tokens_per_day=20))


def test_daily_budget_survives_a_restart(tmp_path: Path) -> None:
    cfg = config(tmp_path, delta=Limits(tokens_per_day=20))
    with running(tmp_path, cfg=cfg) as g:
        client(g.url, g.keys["delta"]).completions.create(model="a1", prompt="one two", max_tokens=20)
    with running(tmp_path, cfg=cfg) as g, pytest.raises(openai.RateLimitError):
        client(g.url, g.keys["delta"]).completions.create(model="a1", prompt="p", max_tokens=1)


def test_bad_bodies_and_paths(tmp_path: Path) -> None:
    with running(tmp_path) as g:
        auth = {"authorization": f"Bearer {g.keys['acme']}"}
        n = len(g.fake.seen)
        cases = [
            (b"{not json", 400), (b"[1, 2]", 400), (b'{"prompt": "x"}', 400), (b'{"model": 3}', 400),
            (b'{"model": "a1", "max_tokens": "9"}', 400), (b'{"model": "a1", "max_tokens": true}', 400),
            (b"x" * (64 * 1024 + 1), 413), (b"[" * 100000 + b"]" * 100000, 413),
        ]
        for body, status in cases:
            r = httpx.post(g.url + "/v1/completions", content=body, headers=auth)
            assert r.status_code == status, body[:40]
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        deep = b"[" * 20000 + b"]" * 20000
        assert httpx.post(g.url + "/v1/chat/completions", content=deep, headers=auth).status_code == 400
        for path in ("/v1/embeddings", "/v1/models/", "/", "/docs"):
            assert httpx.get(g.url + path, headers=auth).status_code == 404, path
        assert httpx.get(g.url + "/v1/completions", headers=auth).status_code == 405
        assert len(g.fake.seen) == n  # none of that reached vLLM


def test_access_log_is_one_json_line_without_secrets(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="serving.gateway.access"), running(tmp_path) as g:
        client(g.url, g.keys["acme"]).completions.create(model="a1", prompt="SECRET PROMPT", max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            client(g.url, "pissa-12345678-" + "y" * 43).models.list()
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "serving.gateway.access"]
    ok = [x for x in lines if x["path"] == "/v1/completions"][0]
    assert ok["tenant"] == "acme" and ok["status"] == 200 and ok["prompt_tokens"] == 2 and ok["completion_tokens"] == 2
    assert {"time", "key_id", "model", "latency_ms", "upstream"} <= set(ok)
    assert any(x["status"] == 401 and x["tenant"] is None for x in lines)
    text = caplog.text
    assert "SECRET" not in text and "tok0" not in text and g.keys["acme"] not in text and "y" * 43 not in text


def test_usage_writer_totals_in_sqlite(tmp_path: Path) -> None:
    db = tmp_path / "u.sqlite"
    w = store.UsageWriter(db)
    for i in range(50):
        w.add("acme", "a1", i, 1)
    assert w.tokens_today("acme") == sum(range(50)) + 50
    w.close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT requests, prompt_tokens, completion_tokens FROM usage").fetchall() == \
            [(50, sum(range(50)), 50)]
    assert store.UsageWriter(db).tokens_today("acme") == sum(range(50)) + 50


def test_review_findings_accounting_cannot_be_dodged(tmp_path: Path) -> None:
    """Non-boolean stream flags (vLLM coerces them) are refused; n multiplies max_tokens against the cap;
    completions keep vLLM's default of 16 when the cap is larger; chat gets the cap."""
    cfg = config(tmp_path, acme=Limits(max_tokens=32))
    with running(tmp_path, cfg=cfg) as g:
        auth = {"authorization": f"Bearer {g.keys['acme']}"}

        def post(path: str, body: dict) -> httpx.Response:
            return httpx.post(g.url + path, headers=auth, json={"model": "a1", "prompt": "p", **body})

        for bad in ({"stream": "true"}, {"stream": 1}, {"stream": True, "stream_options": {"include_usage": "false"}},
                    {"stream": True, "stream_options": []}, {"n": 0}, {"n": "2"}, {"best_of": 1.5}):
            assert post("/v1/completions", bad).status_code == 400, bad
        r = post("/v1/completions", {"n": 4, "max_tokens": 9})
        assert r.status_code == 400 and "n=4" in r.json()["error"]["message"]
        assert post("/v1/completions", {"n": 4, "max_tokens": 8}).status_code == 200
        assert post("/v1/completions", {"n": 33}).status_code == 400
        assert post("/v1/completions", {}).status_code == 200
        assert "max_tokens" not in json.loads(g.fake.seen[-1]["raw"])  # vLLM's default (16) is within the cap
        assert post("/v1/completions", {"n": 4}).status_code == 200
        assert json.loads(g.fake.seen[-1]["raw"])["max_tokens"] == 8  # 32 // 4 < 16: set
        r = httpx.post(g.url + "/v1/chat/completions", headers=auth,
                       json={"model": "a1", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 200 and json.loads(g.fake.seen[-1]["raw"])["max_tokens"] == 32


def test_review_findings_names_grants_and_models(tmp_path: Path) -> None:
    """A manifest adapter's name cannot be reused at run time (a grant would reach it after a restart);
    persisted grants on such names are ignored; tenants do not see adapters' server paths."""
    from dataclasses import replace

    cfg = replace(config(tmp_path), served=("base", "a1", "a2", "b1"))
    store.record_runtime_adapter(cfg.usage_db, "a1", "/elsewhere/a1", ["beta"])  # as an older version allowed
    with running(tmp_path, cfg=cfg) as g:
        admin = {"authorization": f"Bearer {ADMIN_KEY}"}
        r = httpx.post(g.url + "/v1/load_lora_adapter", headers=admin,
                       json={"lora_name": "a1", "lora_path": "/x", "tenants": ["beta"]})
        assert r.status_code == 400 and "served from the manifest" in r.json()["error"]["message"]
        for tenants in (0, {}, "beta"):
            r = httpx.post(g.url + "/v1/load_lora_adapter", headers=admin,
                           json={"lora_name": "n1", "lora_path": "/x", "tenants": tenants})
            assert r.status_code == 400, tenants
        beta = client(g.url, g.keys["beta"])
        assert [m.id for m in beta.models.list()] == ["b1"]  # the stale grant on a1 is not honoured
        with pytest.raises(openai.NotFoundError):
            beta.completions.create(model="a1", prompt="p", max_tokens=1)
        listed = httpx.get(g.url + "/v1/models", headers={"authorization": f"Bearer {g.keys['acme']}"}).json()
        assert all("root" not in m for m in listed["data"])
        assert all("root" in m for m in httpx.get(g.url + "/v1/models", headers=admin).json()["data"])


def test_in_flight_gauge_and_a_client_gone_mid_body(tmp_path: Path) -> None:
    import socket

    with running(tmp_path, fake=FakeVllm(delay=0.3)) as g:
        admin = {"authorization": f"Bearer {ADMIN_KEY}"}
        with httpx.stream("POST", g.url + "/v1/completions", headers={"authorization": f"Bearer {g.keys['acme']}"},
                          json={"model": "a1", "prompt": "p", "max_tokens": 5, "stream": True}) as r:
            chunks = r.iter_raw()  # kept: a dropped iterator closes the response
            next(chunks)
            text = httpx.get(g.url + "/metrics", headers=admin).text
            assert 'pissa_gateway_in_flight{tenant="acme"} 1.0' in text
            for _ in chunks:
                pass
        assert 'pissa_gateway_in_flight{tenant="acme"} 0.0' in httpx.get(g.url + "/metrics", headers=admin).text
        host, port = g.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as s:  # promise 1000 bytes, send 10, hang up
            s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {g.keys['acme']}\r\n"
                      "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\":".encode())
        time.sleep(0.3)
        assert g.gateway.admission.active["acme"] == 0
        assert client(g.url, g.keys["acme"]).models.list()  # still serving
