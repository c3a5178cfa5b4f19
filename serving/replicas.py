"""``pissa serve`` over several vLLM servers: N local replicas and/or upstreams behind ``vllm-router``.

::

    clients ──▶ gateway (with tenants) ──▶ vllm-router (consistent_hash) ──▶ replica 1..N, upstreams
                public                      loopback                         loopback / elsewhere

- Each local replica is an ordinary vLLM server (:func:`serving.launcher.plan_replica_commands`) on
  loopback with its own free port and, on GPU machines, its own ``CUDA_VISIBLE_DEVICES`` slice of
  ``tensor_parallel_size`` devices (:func:`device_slices`).
- ``vllm-router`` (the vLLM project's router, installed with the serving extras) routes over the replicas
  and the manifest's ``upstreams`` with its ``consistent_hash`` policy, which reads :data:`HASH_HEADER`;
  the gateway sets that header to the requested model name, so each adapter stays on one replica. The
  router's flags (:class:`RouterPolicy`) make it drop a dead replica within ~2 s and retry a failed
  request on another one (docs/serving.md, "Replicas", has the experiments behind these numbers).
- With tenants the gateway is the public listener and fans adapter loads/unloads out to every server;
  without tenants the router listens on ``vllm.host:vllm.port`` itself and runtime adapter updates are
  off (the router would send a load to one replica only).
- A supervisor (:class:`Supervisor`) restarts a local replica that died, after :func:`restart_delay`,
  on the same port, with the adapters loaded at run time in its ``--lora-modules``: it is healthy (and
  the router sends it traffic again) only once they are loaded. An upstream is never restarted; the
  router marks it down until it answers again.
- SIGINT/SIGTERM stop everything: gateway, router, every replica's process group.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import secrets
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pissa.core.errors import InvalidOptionsError, ServingError
from serving.command import LaunchPlan
from serving.kv_cache import NodeMemory, cuda_available, read_node_memory
from serving.launcher import (
    DEAD_GRACE,
    ServeResult,
    VllmServer,
    _forward_signals,
    _signal_group,
    plan_replica_commands,
    tail,
)
from serving.manifest import ServeManifest
from serving.vllm_env import free_port, require_vllm
from serving.watch import Health, Observation, WatchPolicy, judge, probe_health

logger = logging.getLogger(__name__)

HASH_HEADER = "X-Session-ID"  # the first header vllm-router's consistent_hash policy looks at
ROUTER_MODULE = "vllm_router.launch_router"
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class RouterPolicy:
    """vllm-router flags: health checks every second (a replica is out after 2 failed checks, back after
    1 good one), a circuit opened after 2 failed requests (so a retry goes to another replica at once)
    and retried after 5 s, and up to 8 retries with backoff capped at 1 s."""

    health_interval: int = 1
    health_failures: int = 2
    health_successes: int = 1
    health_timeout: int = 5
    cb_failures: int = 2
    cb_timeout: int = 5
    retries: int = 8
    max_backoff_ms: int = 1000


def router_command(worker_urls: Sequence[str], *, host: str, port: int, metrics_port: int,
                   startup_timeout: float, policy: RouterPolicy = RouterPolicy(),
                   python: str | None = None) -> tuple[str, ...]:
    """The ``vllm-router`` command line (pure)."""
    p = policy
    return (python or sys.executable, "-m", ROUTER_MODULE, "--host", host, "--port", str(port),
            "--worker-urls", *worker_urls, "--policy", "consistent_hash",
            "--worker-startup-timeout-secs", str(max(1, int(startup_timeout))),
            "--worker-startup-check-interval", "1",
            "--health-check-interval-secs", str(p.health_interval),
            "--health-failure-threshold", str(p.health_failures),
            "--health-success-threshold", str(p.health_successes),
            "--health-check-timeout-secs", str(p.health_timeout),
            "--cb-failure-threshold", str(p.cb_failures), "--cb-timeout-duration-secs", str(p.cb_timeout),
            "--retry-max-retries", str(p.retries), "--retry-max-backoff-ms", str(p.max_backoff_ms),
            "--prometheus-host", LOOPBACK, "--prometheus-port", str(metrics_port), "--log-level", "warning")


def device_slices(replicas: int, tensor_parallel_size: int, device_count: int) -> list[str | None]:
    """``CUDA_VISIBLE_DEVICES`` of each replica: consecutive slices of ``tensor_parallel_size`` devices;
    all None without CUDA devices (CPU).

    Raises:
        InvalidOptionsError: more devices needed than there are.
    """
    if device_count == 0:
        return [None] * replicas
    need = replicas * tensor_parallel_size
    if need > device_count:
        raise InvalidOptionsError(
            "not enough GPUs", [f"vllm.replicas {replicas} x tensor_parallel_size {tensor_parallel_size} needs "
                                f"{need} devices; this machine has {device_count}"],
            fix="lower vllm.replicas or tensor_parallel_size, or add upstreams on other machines")
    return [",".join(str(d) for d in range(i * tensor_parallel_size, (i + 1) * tensor_parallel_size))
            for i in range(replicas)]


def cuda_device_count() -> int:
    """Visible CUDA devices (0 without CUDA or torch)."""
    if not cuda_available():
        return 0
    import torch

    return int(torch.cuda.device_count())


def restart_delay(failures: int, base: float = 1.0, cap: float = 30.0) -> float:
    """Seconds to wait before restarting a replica that failed ``failures`` times in a row (1, 2, 4, ... cap)."""
    return 0.0 if failures <= 0 else min(cap, base * 2 ** (failures - 1))


@dataclass(frozen=True)
class ReplicaPlan:
    """What ``pissa serve`` runs for a routed manifest: each local replica, the router, and where
    clients connect (``public``: the gateway's or the router's address)."""

    replicas: tuple[LaunchPlan, ...]
    router: LaunchPlan
    upstreams: tuple[str, ...]
    public: LaunchPlan
    internal_key: str | None
    replan: Callable[[int], LaunchPlan] = field(compare=False, repr=False)  # replica i, again (restart)


def _keys(manifest: ServeManifest, environ: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(name of the variable the replicas' key is read from, its value).

    vllm-router forwards the caller's ``Authorization`` unchanged, so local replicas and upstreams must
    accept one key: with tenants the gateway's internal key (the upstreams' key when they have one),
    without tenants the manifest's ``api_key_env``.

    Raises:
        InvalidOptionsError: a key variable is unset, or the upstreams' key differs from the replicas'.
    """
    from serving.gateway.run import INTERNAL_KEY_ENV

    up_env = next((u.api_key_env for u in manifest.upstreams if u.api_key_env), None)
    up_key = environ.get(up_env) if up_env else None
    if up_env and not up_key:
        raise InvalidOptionsError("upstream key missing", [f"upstreams name {up_env!r}, which is not set"],
                                  fix=f"export {up_env}=<the upstream servers' key>")
    if manifest.gateway is not None:
        return INTERNAL_KEY_ENV, up_key or environ.get(INTERNAL_KEY_ENV) or secrets.token_urlsafe(32)
    own_env = manifest.vllm.api_key_env
    own_key = environ.get(own_env) if own_env else None
    if up_key and own_key != up_key:
        raise InvalidOptionsError(
            "keys differ", [f"the upstreams' key ({up_env}) differs from vllm.api_key_env's "
                            f"({own_env or 'none'}); vllm-router sends the caller's key to every server"],
            fix="give the local replicas the upstreams' key (vllm.api_key_env), or add tenants: (a gateway)")
    return own_env, own_key


def _on_devices(plan: LaunchPlan, devices: str | None) -> LaunchPlan:
    return dataclasses.replace(plan, env={**plan.env, "CUDA_VISIBLE_DEVICES": devices}) if devices else plan


def _replica_manifest(manifest: ServeManifest, port: int, key_env: str | None) -> ServeManifest:
    if manifest.gateway is not None:
        from serving.gateway.run import upstream_manifest

        return upstream_manifest(manifest, port)  # + the adapters loaded at run time, internal key
    settings = manifest.vllm.model_copy(update={"host": LOOPBACK, "port": port, "api_key_env": key_env,
                                                "runtime_lora_updating": False})
    return dataclasses.replace(manifest, vllm=settings)


def plan_replicas(
    manifest: ServeManifest,
    *,
    environ: Mapping[str, str] | None = None,
    device_count: Callable[[], int] = cuda_device_count,
    memory: Callable[[], NodeMemory] = read_node_memory,
    on_gpu: Callable[[], bool] = cuda_available,
    port: Callable[[], int] = free_port,
) -> ReplicaPlan:
    """Validate once, then plan every local replica and the router (nothing is started).

    Raises:
        AdapterValidationError, InvalidOptionsError, ServingError: as :func:`serving.launcher.plan_serving`;
            also too few GPUs for the replicas, or unset/mismatched keys.
    """
    environ = dict(os.environ if environ is None else environ)
    s = manifest.vllm
    key_env, key = _keys(manifest, environ)
    if key_env and key:
        environ[key_env] = key
    devices = device_slices(s.replicas, s.tensor_parallel_size, device_count())
    ports = [port() for _ in range(s.replicas)]
    snapshot = functools.cache(memory)  # a restart sizes its KV cache as the first start did

    def one(i: int) -> LaunchPlan:
        inner = _replica_manifest(manifest, ports[i], key_env)
        plan = plan_replica_commands(inner, [ports[i]], environ=environ, memory=snapshot,
                                     on_gpu=on_gpu)[0]
        return _on_devices(plan, devices[i])

    first = plan_replica_commands(_replica_manifest(manifest, ports[0], key_env), ports, environ=environ,
                                  memory=snapshot, on_gpu=on_gpu)
    replicas = tuple(_on_devices(p, d) for p, d in zip(first, devices))
    upstreams = tuple(u.url for u in manifest.upstreams)
    gw = manifest.gateway
    r_host, r_port = (LOOPBACK, port()) if gw is not None else (s.host, s.port)
    argv = router_command([p.url for p in replicas] + list(upstreams), host=r_host, port=r_port,
                          metrics_port=port(), startup_timeout=s.health_timeout)
    from serving.command import client_url

    r_url = client_url(r_host, r_port)
    router = LaunchPlan(argv, {}, r_url, first[0].served_names, first[0].max_lora_rank, r_host, r_port)
    notes = [*first[0].notes]
    for i, p in enumerate(replicas, 1):
        devs = p.env.get("CUDA_VISIBLE_DEVICES")
        notes.append(f"replica {i}: {p.url} (loopback)" + (f"; CUDA_VISIBLE_DEVICES={devs}" if devs else ""))
        notes.append(f"  {p.shell()}")
    notes += [f"upstream: {u}" for u in upstreams]
    notes.append(f"vllm-router: {r_url} (consistent_hash on {HASH_HEADER}"
                 + (", set by the gateway to the model name)" if gw else "; send it yourself for adapter affinity)"))
    if gw is not None:
        notes.append(f"tenants: {', '.join(t.name for t in gw.tenants)}; keys {gw.keys_file}; usage {gw.usage_db}")
        public = dataclasses.replace(router, url=client_url(gw.host, gw.port), host=gw.host, port=gw.port)
    else:
        notes.append("no tenants: the router is the public listener; runtime adapter updates are off")
        public = router
    public = dataclasses.replace(public, notes=tuple(notes))
    return ReplicaPlan(replicas, router, upstreams, public, key if gw is not None else None, one)


@dataclass
class Replica:
    """One local replica as the supervisor sees it."""

    index: int
    server: VllmServer
    starting: bool = True
    failures: int = 0
    restart_at: float | None = None
    up_since: float | None = None
    history: deque[Observation] = field(default_factory=lambda: deque(maxlen=16))


class Supervisor:
    """Keeps local replicas running: restarts one that died (process exit, or vLLM's /health verdict,
    :func:`serving.watch.judge`) after :func:`restart_delay`; a replica that served for ``stable`` seconds
    starts counting failures from zero again.

    Args:
        replicas: the started replicas.
        replan: replica index -> its command now (same port, runtime adapters in ``--lora-modules``).
        log_for: replica index -> its log file.
        new_server: makes the server object for a plan (tests pass a stand-in).
        probe: one ``/health`` poll of a URL (default: :func:`serving.watch.probe_health`).
    """

    def __init__(self, replicas: list[Replica], replan: Callable[[int], LaunchPlan], log_for: Callable[[int], Path | None],
                 *, policy: WatchPolicy = WatchPolicy(), health_timeout: float = 300.0, stable: float = 60.0,
                 new_server: Callable[[LaunchPlan, Path | None, float], VllmServer] = VllmServer,
                 probe: Callable[[str, float], tuple[Health, str]] = probe_health) -> None:
        self.new_server = new_server
        self.probe = probe
        self.replicas = replicas
        self.replan = replan
        self.log_for = log_for
        self.policy = policy
        self.health_timeout = health_timeout
        self.stable = stable
        self.restarts = 0

    def step(self, now: float) -> None:
        """One round: probe every replica, stop dead ones, restart those whose delay has passed."""
        for r in self.replicas:
            if r.restart_at is not None:
                if now >= r.restart_at:
                    self._restart(r, now)
                continue
            proc = r.server.process
            code = proc.poll() if proc is not None else -1
            health, detail = (Health.SILENT, "process exited") if code is not None else \
                self.probe(r.server.plan.url + "/health", self.policy.probe_timeout)
            if r.starting:
                if code is None and health is Health.OK:
                    r.starting, r.up_since = False, now
                    r.history.clear()
                    logger.info("replica %d is healthy at %s", r.index + 1, r.server.plan.url)
                    continue
                if code is None and now - (r.up_since or now) < self.health_timeout:
                    continue
                self._died(r, now, f"exited with code {code} while starting" if code is not None else "start timed out")
                continue
            r.history.append(Observation(code, health, detail))
            verdict = judge(r.history, self.policy)
            if verdict is not None:
                self._died(r, now, verdict.reason)

    def _died(self, r: Replica, now: float, reason: str) -> None:
        if r.up_since is not None and not r.starting and now - r.up_since >= self.stable:
            r.failures = 0
        r.failures += 1
        delay = restart_delay(r.failures)
        logger.warning("replica %d (%s): %s; restarting it in %.0f s (log %s)", r.index + 1, r.server.plan.url,
                       reason, delay, r.server.log_path)
        r.server.stop(grace=DEAD_GRACE)
        r.restart_at, r.starting, r.up_since = now + delay, True, None
        r.history.clear()

    def _restart(self, r: Replica, now: float) -> None:
        r.restart_at = None
        try:
            plan = self.replan(r.index)
            r.server = self.new_server(plan, self.log_for(r.index), self.health_timeout)
            r.server.start()
        except ServingError as exc:  # e.g. the port is taken for now: try again later
            logger.warning("replica %d could not be restarted: %s", r.index + 1, exc)
            r.failures += 1
            r.restart_at = now + restart_delay(r.failures)
            return
        self.restarts += 1
        r.starting, r.up_since = True, now
        logger.info("replica %d restarted: %s", r.index + 1, plan.shell())


def _log_for(log_path: Path | None, name: str) -> Path | None:
    return log_path.with_name(f"{log_path.stem}-{name}{log_path.suffix or '.log'}") if log_path else None


def serve_replicas(
    manifest: ServeManifest,
    *,
    dry_run: bool = False,
    log_path: str | Path | None = None,
    on_ready: Callable[[LaunchPlan, float, Path], None] | None = None,
) -> ServeResult:
    """Start every local replica, then vllm-router over them and the upstreams, then the gateway (with
    tenants); supervise until SIGINT/SIGTERM, then stop everything.

    Raises:
        as :func:`plan_replicas`; ServingError: a replica failed at start-up, or the router died.
    """
    plan = plan_replicas(manifest)
    if dry_run:
        return ServeResult(plan.public, None, None, None)
    require_vllm("to run `pissa serve` (--dry-run works without it)")
    log = Path(log_path) if log_path else None
    s = manifest.vllm
    servers = [VllmServer(p, _log_for(log, f"replica{i + 1}"), s.health_timeout) for i, p in enumerate(plan.replicas)]
    router = VllmServer(plan.router, _log_for(log, "router"), s.health_timeout)
    gateway = None
    stop = threading.Event()
    stopped_by: list[str] = []

    def on_signal(signum: int) -> None:
        import signal

        stopped_by.append(signal.Signals(signum).name)
        logger.info("%s received: stopping the gateway, the router and every replica", stopped_by[-1])
        stop.set()
        for srv in [router, *servers]:
            if srv.process is not None:
                _signal_group(srv.process.pid, signal.SIGTERM)

    t0 = time.monotonic()
    with _forward_signals(on_signal):
        try:
            if manifest.gateway is not None:
                from serving.gateway.app import Gateway
                from serving.gateway.server import GatewayServer, bind

                gw = manifest.gateway
                admin_env = s.api_key_env
                admin_key = os.environ.get(admin_env) if admin_env else None
                if admin_env and not admin_key:
                    raise InvalidOptionsError("admin key missing", [f"vllm.api_key_env names {admin_env!r}, which is not set"],
                                              fix=f"export {admin_env}=<admin key> before starting, or drop api_key_env")
                gateway = GatewayServer(Gateway(gw, upstream=plan.router.url, upstream_key=plan.internal_key,
                                                admin_key=admin_key, hash_header=HASH_HEADER,
                                                replicas=[p.url for p in plan.replicas] + list(plan.upstreams)),
                                        bind(gw.host, gw.port))
            for server in servers:
                server.start()
            for server in servers:  # they load in parallel; a signal stops them (wait_healthy then raises)
                server.wait_healthy()
            if stop.is_set():
                return ServeResult(plan.public, str(servers[0].log_path), None, stopped_by[0])
            router.start()
            router.wait_healthy()
            if gateway is not None:
                gateway.start()
            startup = time.monotonic() - t0
            if on_ready is not None and not stop.is_set():
                on_ready(plan.public, startup, servers[0].log_path)  # type: ignore[arg-type]
            supervisor = Supervisor([Replica(i, srv, starting=False, up_since=time.monotonic())
                                     for i, srv in enumerate(servers)], plan.replan,
                                    lambda i: _log_for(log, f"replica{i + 1}"), health_timeout=s.health_timeout)
            while not stop.wait(1.0):
                if not router.alive():
                    raise ServingError(f"vllm-router exited (code {router.process.poll()}); last lines of "  # type: ignore[union-attr]
                                       f"{router.log_path}:\n" + tail(router.log_path),  # type: ignore[arg-type]
                                       fix="read the router's log, then start `pissa serve` again")
                supervisor.step(time.monotonic())
                servers = [r.server for r in supervisor.replicas]
        except ServingError:
            if stopped_by:
                return ServeResult(plan.public, str(servers[0].log_path), None, stopped_by[0])
            raise
        finally:
            if gateway is not None:
                gateway.stop()
            stoppers = [threading.Thread(target=srv.stop) for srv in [router, *servers]]
            for t in stoppers:
                t.start()
            for t in stoppers:
                t.join()
    return ServeResult(plan.public, str(servers[0].log_path), startup, stopped_by[0] if stopped_by else None)
