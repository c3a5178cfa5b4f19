"""Replicas without servers: the manifest's replicas/upstreams, the planned commands (replicas, router,
GPU slices), the supervisor's restart decisions with stand-in servers, and the gateway's replica
features (hash header, fan-out of adapter loads, resend before the first byte, broken streams)
against stand-in vLLMs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from pissa.core.errors import InvalidOptionsError, ManifestError
from serving.command import LaunchPlan
from serving.kv_cache import NodeMemory
from serving.manifest import load_serve_manifest
from serving.replicas import (
    HASH_HEADER,
    Replica,
    Supervisor,
    device_slices,
    plan_replicas,
    restart_delay,
    router_command,
)
from serving.watch import Health

HEAD = "base:\n  path: org/base\n  served_name: base\nadapters:\n  - name: a1\n    path: org/a1\n"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "serve.yaml"
    p.write_text(HEAD + text)
    return p


# --- manifest -------------------------------------------------------------------------------------
def test_without_replicas_or_upstreams_nothing_is_routed(tmp_path: Path) -> None:
    m = load_serve_manifest(write(tmp_path, ""))
    assert m.vllm.replicas == 1 and m.upstreams == () and not m.routed


def test_replicas_and_upstreams_resolve(tmp_path: Path) -> None:
    m = load_serve_manifest(write(tmp_path, "vllm: {replicas: 3}\nupstreams:\n"
                                            "  - {url: 'http://10.0.0.2:8000/', api_key_env: UP_KEY}\n"
                                            "  - {url: 'https://gpu-b:9000', api_key_env: UP_KEY}\n"))
    assert m.routed and m.vllm.replicas == 3
    assert [(u.url, u.api_key_env) for u in m.upstreams] == [("http://10.0.0.2:8000", "UP_KEY"),
                                                             ("https://gpu-b:9000", "UP_KEY")]


def test_every_replica_problem_at_once_with_lines(tmp_path: Path) -> None:
    p = write(tmp_path, """vllm:
  replicas: 0
upstreams:
  - url: ftp://x:1
    api_key_env: 1BAD
  - url: http://10.0.0.2
  - url: http://10.0.0.3:8000/v1
  - {url: "http://10.0.0.4:8000", api_key_env: A}
  - {url: "http://10.0.0.4:8000/", api_key_env: B}
  - {url: "http://10.0.0.5:8000", bogus: 1}
""")
    with pytest.raises(ManifestError) as err:
        load_serve_manifest(p)
    text = str(err.value)
    for expected in ("line 8: vllm.replicas: must be >= 1", "line 10: upstreams[0].url: 'ftp://x:1' is not an http",
                     "line 11: upstreams[0].api_key_env: '1BAD' is not an environment variable name",
                     "line 12: upstreams[1].url: 'http://10.0.0.2' has no port",
                     "line 13: upstreams[2].url: 'http://10.0.0.3:8000/v1' must be just scheme://host:port",
                     "line 15: upstreams[4].url: http://10.0.0.4:8000 is listed twice (first on line 14)",
                     "line 15: upstreams[4].api_key_env: every upstream must use the same api_key_env",
                     "line 16: upstreams[5].bogus"):
        assert expected in text, text


# --- commands -------------------------------------------------------------------------------------
@pytest.fixture
def local_manifest(tmp_path: Path, tiny_llama: Path) -> Path:
    from serving.testing import make_peft_adapter

    make_peft_adapter(tiny_llama, tmp_path / "a1", seed=1)
    return tmp_path


def _plan(root: Path, text: str, devices: int = 0, environ: dict[str, str] | None = None):
    p = root / "serve.yaml"
    p.write_text(text)
    ports = iter(range(41000, 41100))
    return plan_replicas(load_serve_manifest(p), environ=environ or {}, device_count=lambda: devices,
                         memory=lambda: NodeMemory(None, 8 << 30, 4 << 30), on_gpu=lambda: devices > 0,
                         port=lambda: next(ports))


def _manifest(tiny: Path, root: Path, extra: str = "", vllm: str = "replicas: 2") -> str:
    return (f"base: {{path: {tiny}, served_name: base}}\nadapters: [{{name: a1, path: {root / 'a1'}}}]\n"
            f"vllm: {{dtype: float32, kv_cache_memory_bytes: 64M, {vllm}}}\n{extra}")


def test_plan_two_cpu_replicas_and_the_router(local_manifest: Path, tiny_llama: Path) -> None:
    plan = _plan(local_manifest, _manifest(tiny_llama, local_manifest, "upstreams: [{url: 'http://10.0.0.2:8000'}]\n"))
    assert [p.port for p in plan.replicas] == [41000, 41001]
    for p in plan.replicas:
        argv = list(p.argv)
        assert argv[argv.index("--host") + 1] == "127.0.0.1" and "CUDA_VISIBLE_DEVICES" not in p.env
        assert "a1=" + str(local_manifest / "a1") in argv
        assert p.env.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING") is None  # no gateway: updates would reach one replica
    router = list(plan.router.argv)
    assert router[router.index("--policy") + 1] == "consistent_hash"
    workers = router[router.index("--worker-urls") + 1: router.index("--policy")]
    assert workers == ["http://127.0.0.1:41000", "http://127.0.0.1:41001", "http://10.0.0.2:8000"]
    assert plan.public.port == 8000 and plan.public.host == "127.0.0.1"  # no tenants: the router is public
    assert any(n.startswith("replica 2: http://127.0.0.1:41001") for n in plan.public.notes)


def test_gpu_replicas_get_their_own_devices(local_manifest: Path, tiny_llama: Path) -> None:
    text = _manifest(tiny_llama, local_manifest, vllm="replicas: 2, tensor_parallel_size: 2")
    plan = _plan(local_manifest, text, devices=4)
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in plan.replicas] == ["0,1", "2,3"]
    assert plan.replan(1).env["CUDA_VISIBLE_DEVICES"] == "2,3"
    with pytest.raises(InvalidOptionsError, match="needs 4 devices; this machine has 3"):
        _plan(local_manifest, text, devices=3)


def test_device_slices() -> None:
    assert device_slices(3, 1, 0) == [None, None, None]
    assert device_slices(3, 1, 4) == ["0", "1", "2"]
    assert device_slices(2, 3, 6) == ["0,1,2", "3,4,5"]


def test_tenants_put_the_router_on_loopback_and_share_the_upstreams_key(local_manifest: Path, tiny_llama: Path) -> None:
    text = _manifest(tiny_llama, local_manifest, "upstreams: [{url: 'http://10.0.0.2:8000', api_key_env: UP}]\n"
                     "gateway: {host: 0.0.0.0, port: 9000}\ntenants: [{name: acme, models: [a1]}]\n")
    plan = _plan(local_manifest, text, environ={"UP": "shared-key"})
    assert plan.router.host == "127.0.0.1" and plan.router.port != 9000 and plan.public.port == 9000
    assert plan.internal_key == "shared-key" and all(p.env["VLLM_API_KEY"] == "shared-key" for p in plan.replicas)
    assert all(p.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True" for p in plan.replicas)
    with pytest.raises(InvalidOptionsError, match="'UP', which is not set"):
        _plan(local_manifest, text)


def test_without_tenants_the_upstreams_key_must_be_the_replicas(local_manifest: Path, tiny_llama: Path) -> None:
    text = _manifest(tiny_llama, local_manifest, "upstreams: [{url: 'http://10.0.0.2:8000', api_key_env: UP}]\n",
                     vllm="replicas: 2, api_key_env: OWN")
    with pytest.raises(InvalidOptionsError, match="differs from vllm.api_key_env"):
        _plan(local_manifest, text, environ={"UP": "k1", "OWN": "k2"})
    assert _plan(local_manifest, text, environ={"UP": "k1", "OWN": "k1"}).replicas[0].env["VLLM_API_KEY"] == "k1"


def test_dry_run_prints_every_command(local_manifest: Path, tiny_llama: Path) -> None:
    from click.testing import CliRunner

    from pissa.cli import cli

    p = local_manifest / "serve.yaml"
    p.write_text(_manifest(tiny_llama, local_manifest))
    out = CliRunner().invoke(cli, ["serve", str(p), "--dry-run"])
    assert out.exit_code == 0, out.output
    assert out.output.count("-m vllm.entrypoints.openai.api_server") == 2
    assert out.output.count("-m vllm_router.launch_router") == 1


def test_router_command_is_loopback_consistent_hash() -> None:
    argv = router_command(["http://127.0.0.1:1", "http://h:2"], host="127.0.0.1", port=3, metrics_port=4,
                          startup_timeout=60)
    assert argv[1:3] == ("-m", "vllm_router.launch_router")
    assert argv[argv.index("--prometheus-host") + 1] == "127.0.0.1"
    assert argv[argv.index("--worker-urls") + 1: argv.index("--worker-urls") + 3] == ("http://127.0.0.1:1", "http://h:2")


# --- supervisor -----------------------------------------------------------------------------------
def test_restart_delay_doubles_up_to_the_cap() -> None:
    assert [restart_delay(n) for n in range(8)] == [0, 1, 2, 4, 8, 16, 30, 30]
    assert restart_delay(3, base=0.5, cap=1.5) == 1.5


@dataclass
class FakeProcess:
    code: int | None = None

    def poll(self) -> int | None:
        return self.code


@dataclass
class FakeServer:
    plan: LaunchPlan
    log_path: Path | None = None
    health_timeout: float = 300.0
    process: FakeProcess | None = field(default_factory=FakeProcess)
    stopped: bool = False

    def start(self) -> None:
        self.process = FakeProcess()

    def stop(self, grace: float = 20.0) -> int | None:
        self.stopped = True
        return 0


def _lp(port: int) -> LaunchPlan:
    return LaunchPlan(("vllm", str(port)), {}, f"http://127.0.0.1:{port}", ("base",), 8, "127.0.0.1", port)


def test_supervisor_restarts_a_dead_replica_with_backoff_then_sees_it_rejoin() -> None:
    health: dict[str, Health] = {}
    replans: list[int] = []
    servers = [FakeServer(_lp(1)), FakeServer(_lp(2))]
    sup = Supervisor([Replica(i, s, starting=False, up_since=0.0) for i, s in enumerate(servers)],
                     replan=lambda i: replans.append(i) or _lp(i + 1), log_for=lambda i: None,
                     new_server=FakeServer, probe=lambda url, t: (health.get(url, Health.OK), ""))  # type: ignore[arg-type]
    sup.step(1.0)
    assert replans == [] and not servers[0].stopped
    servers[1].process.code = -9  # SIGKILL
    sup.step(2.0)
    r = sup.replicas[1]
    assert servers[1].stopped and r.restart_at == 3.0 and r.failures == 1 and replans == []
    sup.step(2.5)
    assert replans == []  # not before the delay
    health["http://127.0.0.1:2/health"] = Health.SILENT  # restarted, still loading
    sup.step(3.0)
    assert replans == [1] and r.starting and r.server is not servers[1]
    sup.step(4.0)
    assert r.starting  # loading is not a failure
    r.server.process.code = 1  # dies while starting: next delay is longer
    sup.step(5.0)
    assert r.failures == 2 and r.restart_at == 7.0
    sup.step(7.0)
    health["http://127.0.0.1:2/health"] = Health.OK
    sup.step(8.0)
    assert not r.starting and sup.restarts == 2 and replans == [1, 1]
    r.server.process.code = -9  # dies after serving a long time: backoff starts again from 1 s
    sup.step(8.0 + 120)
    assert r.failures == 1 and r.restart_at == 8.0 + 121
    assert not sup.replicas[0].server.stopped


def test_supervisor_restarts_on_vllms_engine_dead_verdict() -> None:
    server = FakeServer(_lp(1))
    sup = Supervisor([Replica(0, server, starting=False, up_since=0.0)], replan=lambda i: _lp(1),
                     log_for=lambda i: None, new_server=FakeServer,  # type: ignore[arg-type]
                     probe=lambda url, t: (Health.DEAD, "503"))
    sup.step(1.0)
    assert not server.stopped  # one 503 is not yet a verdict
    sup.step(2.0)
    assert server.stopped and sup.replicas[0].restart_at == 3.0


# --- gateway features, against two stand-in vLLMs -------------------------------------------------
def test_gateway_sets_the_hash_header_and_fans_adapter_loads_out(tmp_path: Path) -> None:
    from gateway_env import ADMIN_KEY, config

    from serving.gateway import keys
    from serving.gateway.app import Gateway
    from serving.gateway.server import GatewayServer, bind
    from tests.fake_vllm import FakeVllm, ThreadServer

    cfg = config(tmp_path)
    key = keys.add_key(cfg.keys_file, "acme")[0]
    one, two = FakeVllm(), FakeVllm()
    with ThreadServer(one.app()) as s1, ThreadServer(two.app()) as s2:
        gw = Gateway(cfg, upstream=s1.url, upstream_key="internal", admin_key=ADMIN_KEY, hash_header=HASH_HEADER,
                     replicas=[s1.url, s2.url, "http://127.0.0.1:9"])  # the last one is down
        server = GatewayServer(gw, bind("127.0.0.1", 0))
        server.start()
        try:
            url = f"http://127.0.0.1:{server.port}"
            r = httpx.post(url + "/v1/completions", json={"model": "a1", "prompt": "x"},
                           headers={"authorization": f"Bearer {key}"})
            assert r.status_code == 200 and one.seen[-1]["headers"][HASH_HEADER.lower()] == "a1"
            admin = {"authorization": f"Bearer {ADMIN_KEY}"}
            r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "new", "lora_path": "/x"}, headers=admin)
            body = r.json()
            assert r.status_code == 200, body
            assert [x["status"] for x in body["replicas"]] == [200, 200, None]
            assert "new" in one.models and "new" in two.models
            from serving.client import replica_answers

            assert [a.status for a in replica_answers(r.text)] == [200, 200, None]
            two.models.remove("new")  # replica 2 lost it: the unload reports its refusal
            r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "new"}, headers=admin)
            assert r.status_code == 404 and [x["status"] for x in r.json()["replicas"]] == [200, 404, None]
            assert "new" not in one.models
        finally:
            server.stop()


class FlakyTransport(httpx.AsyncBaseTransport):
    """The first request's answer breaks before its first byte (as vllm-router's stream from a replica
    that died); later ones go to the stand-in."""

    def __init__(self, inner: httpx.AsyncBaseTransport, mode: str) -> None:
        self.inner, self.mode, self.calls = inner, mode, 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        if self.calls == 1 and self.mode == "before":
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=Broken([]))
        response = await self.inner.handle_async_request(request)
        if self.mode == "after":
            data = b"".join([c async for c in response.aiter_raw()])
            return httpx.Response(200, headers={"content-type": "text/event-stream"},
                                  stream=Broken([data.split(b"\n\n")[0] + b"\n\n"]))
        return response


class Broken(httpx.AsyncByteStream):
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def __aiter__(self):
        for c in self.chunks:
            yield c
        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")


@pytest.mark.parametrize("mode", ["before", "after"])
def test_stream_resent_before_its_first_byte_error_event_after(tmp_path: Path, mode: str) -> None:
    import asyncio

    from gateway_env import ADMIN_KEY, config

    from serving.gateway import keys
    from serving.gateway.app import Gateway
    from tests.fake_vllm import FakeVllm

    cfg = config(tmp_path)
    key = keys.add_key(cfg.keys_file, "acme")[0]
    fake = FakeVllm()
    transport = FlakyTransport(httpx.ASGITransport(app=fake.app()), mode)
    gw = Gateway(cfg, upstream="http://up", upstream_key="internal", admin_key=ADMIN_KEY, transport=transport)

    async def go() -> str:
        async with gw.running():
            client = httpx.AsyncClient(transport=httpx.ASGITransport(app=gw.app()), base_url="http://gw")
            r = await client.post("/v1/completions", json={"model": "a1", "prompt": "x", "stream": True,
                                                            "max_tokens": 3},
                                  headers={"authorization": f"Bearer {key}"})
            return r.text

    text = asyncio.run(go())
    events = [e for e in text.split("\n\n") if e]
    if mode == "before":  # sent again, complete
        assert transport.calls == 2 and events[-1] == "data: [DONE]" and len(events) == 4
    else:  # not replayed: what came, then the OpenAI-shape error
        assert transport.calls == 1 and len(events) == 2
        assert json.loads(events[-1][len("data: "):])["error"]["code"] == 502


# --- the real vllm-router between the gateway and two stand-in vLLMs -------------------------------
@pytest.mark.slow
def test_vllm_router_keeps_each_model_on_one_server_and_fails_over(tmp_path: Path) -> None:
    """vllm-router (the installed binary, with :func:`router_command`'s flags) behind the gateway: every
    model's requests reach one stand-in; with that stand-in gone, they all still succeed on the other."""
    import subprocess
    import time
    from collections import Counter

    from gateway_env import ADMIN_KEY, config

    from serving.gateway import keys
    from serving.gateway.app import Gateway
    from serving.gateway.server import GatewayServer, bind
    from serving.vllm_env import free_port
    from tests.fake_vllm import FakeVllm, ThreadServer

    cfg = config(tmp_path)
    key = keys.add_key(cfg.keys_file, "acme")[0]
    fakes = [FakeVllm(), FakeVllm()]
    servers = [ThreadServer(f.app()) for f in fakes]
    for s in servers:
        s.__enter__()
    port = free_port()
    argv = router_command([s.url for s in servers], host="127.0.0.1", port=port, metrics_port=free_port(),
                          startup_timeout=30)
    with open(tmp_path / "router.log", "w") as log:
        router = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log)
    gateway = GatewayServer(Gateway(cfg, upstream=f"http://127.0.0.1:{port}", upstream_key="internal",
                                    admin_key=ADMIN_KEY, hash_header=HASH_HEADER,
                                    replicas=[s.url for s in servers]), bind("127.0.0.1", 0))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert router.poll() is None and time.monotonic() < deadline, (tmp_path / "router.log").read_text()
            time.sleep(0.2)
        gateway.start()
        url = f"http://127.0.0.1:{gateway.port}/v1/completions"
        auth = {"authorization": f"Bearer {key}"}
        for model in ("a1", "base"):  # acme's models
            for i in range(10):
                r = httpx.post(url, json={"model": model, "prompt": f"p{i}"}, headers=auth, timeout=30)
                assert r.status_code == 200, r.text
        where = {m: Counter(n for n, f in enumerate(fakes) for e in f.seen
                            if e["path"] == "/v1/completions" and json.loads(e["raw"])["model"] == m)
                 for m in ("a1", "base")}
        assert all(len(c) == 1 and sum(c.values()) == 10 for c in where.values()), where
        victim = next(iter(where["a1"]))
        servers[victim].__exit__(None, None, None)  # a1's server is gone (port closed)
        for i in range(10):
            r = httpx.post(url, json={"model": "a1", "prompt": f"q{i}"}, headers=auth, timeout=30)
            assert r.status_code == 200, r.text
        other = fakes[1 - victim]
        assert sum(1 for e in other.seen if e["path"] == "/v1/completions"
                   and json.loads(e["raw"])["model"] == "a1") == 10
    finally:
        gateway.stop()
        router.terminate()
        router.wait(timeout=10)
        for s in servers:
            if s.thread.is_alive():
                s.__exit__(None, None, None)


def test_upstreams_compared_as_addresses_and_not_this_server(tmp_path: Path) -> None:
    # A second review (2026-12-08): other spellings of one address, and the router's own port, were accepted.
    p = tmp_path / "serve.yaml"
    p.write_text("base: {path: org/base}\nvllm: {port: 8000}\nupstreams:\n  - url: http://localhost:8100\n"
                 "  - url: HTTP://LOCALHOST:08100\n  - url: http://127.0.0.1:8000\n")
    with pytest.raises(ManifestError) as exc:
        load_serve_manifest(p)
    problems = exc.value.problems()
    assert len(problems) == 2, problems
    assert "line 5" in problems[0] and "is listed twice (first on line 4)" in problems[0]
    assert "line 6" in problems[1] and "this server's own public address" in problems[1]


def test_memory_errors_with_replicas_say_the_memory_was_split(local_manifest: Path, tiny_llama: Path) -> None:
    # 4 GiB free over 100 replicas: 40 MiB each, less than the 64 MiB asked for (the message did not say why).
    from pissa.core.errors import ServingError

    with pytest.raises(ServingError, match="free on this machine, for each of 100 replicas"):
        _plan(local_manifest, _manifest(tiny_llama, local_manifest, vllm="replicas: 100"))
