"""Start vLLM's OpenAI server for a manifest, wait until healthy, forward signals, leave nothing behind.

The server runs in its own process group (``start_new_session``) so that stopping it reaches every
process vLLM spawned (API server, engine core, workers): SIGTERM to the group, then SIGKILL to the
group after a grace period. SIGINT/SIGTERM sent to ``pissa serve`` are forwarded that way, and on
Linux the server gets SIGTERM if ``pissa serve`` itself is killed (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from pissa.core.errors import InvalidOptionsError, ServingError
from serving.command import LaunchPlan, build_command
from serving.kv_cache import NodeMemory, cuda_available, decide_kv_cache, read_node_memory, weights_bytes
from serving.manifest import ServeManifest
from serving.validate import BaseInfo, ValidationReport, read_base, validate_adapters
from serving.vllm_env import require_vllm
from serving.watch import Verdict, WatchPolicy, probe_health, watch

logger = logging.getLogger(__name__)

LOG_TAIL_LINES = 30
DEAD_GRACE = 5.0  # seconds between SIGTERM and SIGKILL when the server is already dead


def plan_serving(
    manifest: ServeManifest,
    *,
    environ: Mapping[str, str] | None = None,
    memory: Callable[[], NodeMemory] = read_node_memory,
    on_gpu: Callable[[], bool] = cuda_available,
) -> LaunchPlan:
    """Validate every adapter against the base, choose the KV cache size on CPU if none is given, then
    build the vLLM command (its ``notes`` say what was chosen).

    Args:
        manifest: what to serve.
        environ: the environment vLLM will inherit (default: ``os.environ``).
        memory, on_gpu: the probes :func:`serving.kv_cache.decide_kv_cache` uses (tests pass stand-ins).

    Raises:
        AdapterValidationError: every problem of every adapter (nothing is started).
        InvalidOptionsError: e.g. the API key variable is not set.
        ServingError: on CPU with no KV cache size given, too little free memory to serve.
    """
    environ = os.environ if environ is None else environ
    base, report = _validate(manifest)
    s = manifest.vllm
    kv = decide_kv_cache(
        s.kv_cache_memory_bytes, max_model_len=s.max_model_len, extra_args=manifest.extra_args, environ=environ,
        on_gpu=on_gpu, memory=memory,
        weights=lambda: weights_bytes(base.local_path, s.dtype) // max(1, s.tensor_parallel_size),
    )
    return build_command(manifest, report.max_lora_rank, environ=environ, kv_cache=kv)


def plan_replica_commands(
    manifest: ServeManifest,
    ports: Sequence[int],
    *,
    environ: Mapping[str, str] | None = None,
    memory: Callable[[], NodeMemory] = read_node_memory,
    on_gpu: Callable[[], bool] = cuda_available,
) -> list[LaunchPlan]:
    """One vLLM command per port (loopback) for ``manifest``: adapters validated once, and on CPU the KV
    cache chosen once for each replica's share (1/N) of the free memory.

    Raises:
        as :func:`plan_serving`.
    """
    environ = os.environ if environ is None else environ
    base, report = _validate(manifest)
    s = manifest.vllm
    n = max(1, len(ports))

    def share() -> NodeMemory:
        m = memory()
        return dataclasses.replace(m, available=m.available // n, share=n)

    kv = decide_kv_cache(
        s.kv_cache_memory_bytes, max_model_len=s.max_model_len, extra_args=manifest.extra_args, environ=environ,
        on_gpu=on_gpu, memory=share,
        weights=lambda: weights_bytes(base.local_path, s.dtype) // max(1, s.tensor_parallel_size),
    )
    plans = []
    for port in ports:
        one = dataclasses.replace(manifest, vllm=s.model_copy(update={"host": "127.0.0.1", "port": port}))
        plans.append(build_command(one, report.max_lora_rank, environ=environ, kv_cache=kv))
    return plans


def validate_manifest(manifest: ServeManifest) -> ValidationReport:
    """Check the manifest's adapters against its base (see :mod:`serving.validate`)."""
    return _validate(manifest)[1]


def _validate(manifest: ServeManifest) -> tuple[BaseInfo, ValidationReport]:
    base = read_base(
        manifest.base.ref.value, is_local=manifest.base.ref.is_local, aliases=manifest.base.aliases,
    )
    report = validate_adapters(
        base, [(a.name, a.ref.value, a.ref.is_local) for a in manifest.adapters],
        min_max_lora_rank=manifest.vllm.max_lora_rank,
    )
    return base, report


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """Last ``lines`` lines of a text file ('' if unreadable)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def port_problem(host: str, port: int) -> str | None:
    """None if ``host:port`` can be bound now, else why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


@dataclass
class VllmServer:
    """One vLLM server process group. Use as a context manager, or ``start``/``stop``.

    Attributes:
        plan: what to run.
        log_path: where the server's stdout+stderr go (default: a temp file).
        health_timeout: seconds to wait for ``/health``.
    """

    plan: LaunchPlan
    log_path: Path | None = None
    health_timeout: float = 300.0
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the server (does not wait; see :meth:`wait_healthy`).

        Raises:
            ServingError: the port is taken.
        """
        host, port = self.plan.host, self.plan.port
        problem = port_problem(host, port)
        if problem:
            raise ServingError(problem, fix="choose another port (vllm.port) or stop what uses it")
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix=f"pissa-serve-{port}-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        env = {**os.environ, **self.plan.env}
        logger.info("starting vLLM (log: %s): %s", self.log_path, self.plan.shell())
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                list(self.plan.argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True, preexec_fn=_die_with_parent_hook(),
            )

    def wait_healthy(self) -> float:
        """Block until ``/health`` answers 200; returns the seconds it took.

        Raises:
            ServingError: the server died (with the tail of its log) or the timeout passed (the
                server is then stopped).
        """
        assert self.process is not None, "start() first"
        t0 = time.monotonic()
        while True:
            code = self.process.poll()
            if code is not None:
                raise ServingError(
                    f"vLLM exited with code {code} during start-up; last lines of {self.log_path}:\n"
                    + tail(self.log_path),  # type: ignore[arg-type]
                    fix="read the log above; `pissa serve --dry-run` shows the command",
                )
            if http_ok(self.plan.url + "/health"):
                return time.monotonic() - t0
            if time.monotonic() - t0 > self.health_timeout:
                text = tail(self.log_path)  # type: ignore[arg-type]
                self.stop()
                raise ServingError(
                    f"vLLM was not healthy after {self.health_timeout:.0f} s (stopped it); last lines of "
                    f"{self.log_path}:\n{text}",
                    fix="raise vllm.health_timeout, or read the log",
                )
            time.sleep(0.5)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace: float = 20.0) -> int | None:
        """SIGTERM the whole process group, SIGKILL it after ``grace`` s; returns the exit code."""
        proc = self.process
        if proc is None:
            return None
        pgid = proc.pid  # start_new_session: the server leads its own group
        _signal_group(pgid, signal.SIGTERM)
        try:
            code = proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            logger.warning("vLLM did not stop within %.0f s: killing its process group", grace)
            _signal_group(pgid, signal.SIGKILL)
            code = proc.wait(timeout=10)
        # Children that outlived the leader (same group): give them the grace too, then kill.
        deadline = time.monotonic() + grace
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _group_alive(pgid):
            _signal_group(pgid, signal.SIGKILL)
        return code

    def __enter__(self) -> VllmServer:
        self.start()
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` (Linux) that asks for SIGTERM when the launching process dies, even by SIGKILL,
    so a killed ``pissa serve`` does not leave vLLM running (vLLM then stops its own children).

    libc's ``prctl`` is resolved here, in the parent: the hook run between fork and exec only calls
    it (no imports, no library loading, which could deadlock in a forked child of a threaded parent).
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig, sigterm = 1, int(signal.SIGTERM)

    def hook() -> None:
        prctl(pr_set_pdeathsig, sigterm)

    return hook


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _forward_signals(on_signal: Callable[[int], None]) -> Iterator[None]:
    """Route SIGINT/SIGTERM to ``on_signal`` while inside (main thread only; else a no-op)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        on_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@dataclass(frozen=True)
class ServeResult:
    plan: LaunchPlan
    log_path: str | None
    startup_seconds: float | None
    stopped_by: str | None


def serve(
    manifest: ServeManifest,
    *,
    dry_run: bool = False,
    log_path: str | Path | None = None,
    on_ready: Callable[[LaunchPlan, float, Path], None] | None = None,
) -> ServeResult:
    """Validate, start vLLM, wait until healthy, then run until a signal or the server's death.

    Args:
        manifest: what to serve.
        dry_run: only validate and return the plan (nothing is started).
        log_path: vLLM's log file (default: a temp file, named in the result and errors).
        on_ready: called once ``/health`` answers (the CLI prints the endpoint there).

    Returns:
        the plan, log path, start-up time and the signal that stopped the server.

    Raises:
        AdapterValidationError: adapters refused before launch.
        InvalidOptionsError: ``log_path``'s folder does not exist.
        MissingDependencyError: vLLM (or the openai client) is not installed.
        ServingError: the server failed to start, or died while serving (tail of its log).
    """
    if log_path is not None and not Path(log_path).expanduser().absolute().parent.is_dir():
        raise InvalidOptionsError("invalid serve options", [f"--log-file {log_path}: its folder does not exist"],
                                  fix="create the folder, or give another --log-file")
    if manifest.routed:  # replicas and/or upstreams behind vllm-router
        from serving.replicas import serve_replicas

        return serve_replicas(manifest, dry_run=dry_run, log_path=log_path, on_ready=on_ready)
    if manifest.gateway is not None:  # tenants: vLLM on loopback behind the gateway
        from serving.gateway.run import serve_with_gateway

        return serve_with_gateway(manifest, dry_run=dry_run, log_path=log_path, on_ready=on_ready)
    plan = plan_serving(manifest)
    if dry_run:
        return ServeResult(plan, None, None, None)
    require_vllm("to run `pissa serve` (--dry-run works without it)")
    return run_plan(plan, health_timeout=manifest.vllm.health_timeout, log_path=log_path, on_ready=on_ready)


def run_plan(
    plan: LaunchPlan,
    *,
    health_timeout: float = 300.0,
    log_path: str | Path | None = None,
    on_ready: Callable[[LaunchPlan, float, Path], None] | None = None,
    watch_policy: WatchPolicy = WatchPolicy(),
) -> ServeResult:
    """Run ``plan`` until SIGINT/SIGTERM (forwarded to the server's process group) or its death.

    While serving, ``/health`` and the server process are watched (:mod:`serving.watch`): when the
    process exits, or ``/health`` says the engine is dead (503) or stops answering, the whole process
    group is stopped and a :class:`ServingError` with the log tail is raised — a dead engine is never
    left answering HTTP 500.

    Raises:
        ServingError: start-up failure or timeout, or the server died while serving (log tail).
    """
    server = VllmServer(plan, Path(log_path) if log_path else None, health_timeout)
    stopped_by: list[str] = []

    def on_signal(signum: int) -> None:
        stopped_by.append(signal.Signals(signum).name)
        logger.info("%s received: stopping vLLM", stopped_by[-1])
        if server.process is not None:
            _signal_group(server.process.pid, signal.SIGTERM)

    grace = 20.0
    with _forward_signals(on_signal):
        server.start()
        try:
            startup = server.wait_healthy()
            if on_ready is not None and not stopped_by:
                on_ready(plan, startup, server.log_path)  # type: ignore[arg-type]
            verdict = _watch(server, watch_policy, lambda: bool(stopped_by))
            if verdict is not None and not stopped_by:
                log_tail = tail(server.log_path)  # type: ignore[arg-type]  # before our SIGTERM adds lines
                logger.info("%s: stopping vLLM", verdict.reason)
                grace = DEAD_GRACE
                raise ServingError(
                    f"{verdict.reason}; stopped vLLM and its processes; last lines of {server.log_path}:\n"
                    + log_tail,
                    fix="read the log above (the first error is the cause), then start `pissa serve` again",
                )
        except ServingError:
            if stopped_by:  # stopped on request while starting: not a failure
                return ServeResult(plan, str(server.log_path), None, stopped_by[0])
            raise
        finally:
            server.stop(grace=grace)
    return ServeResult(plan, str(server.log_path), startup, stopped_by[0])


def _watch(server: VllmServer, policy: WatchPolicy, stop_requested: Callable[[], bool]) -> Verdict | None:
    """Watch a healthy server (:func:`serving.watch.watch`) until it dies or a stop is requested."""
    proc = server.process
    assert proc is not None

    def wait(seconds: float) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=seconds)

    url = server.plan.url + "/health"
    return watch(proc.poll, lambda: probe_health(url, policy.probe_timeout), policy, wait=wait,
                 stop_requested=stop_requested)
