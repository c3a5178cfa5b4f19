"""The launcher with stand-in servers (fast) and one real vLLM start-up failure.

Stand-ins are small Python programs run exactly like vLLM (same process-group handling): one dies at
once, one never becomes healthy, one serves /health and spawns a grandchild, one whose "engine" dies
(/health 503, requests 500) while the process stays up, one that stops answering. They check the log
tail on death, the health timeout, SIGTERM forwarding, the watch while serving, and that no process is
left behind. The real-vLLM tests (``vllm``): a start-up failure, and the engine core killed while serving.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from procs import alive, children, descendants, free_port

from pissa.core.errors import ServingError
from serving.command import LaunchPlan
from serving.launcher import VllmServer, run_plan, tail
from serving.watch import WatchPolicy


def _plan(code: str, port: int) -> LaunchPlan:
    return LaunchPlan((sys.executable, "-c", textwrap.dedent(code), str(port)), {}, f"http://127.0.0.1:{port}",
                      ("base",), 8, "127.0.0.1", port)


DIES = """
import sys
print("INFO starting"); print("ERROR boom: unsupported configuration", flush=True); sys.exit(3)
"""

NEVER_HEALTHY = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
print(f"CHILD {child.pid}", flush=True)
time.sleep(300)
"""

HEALTHY = """
import http.server, subprocess, sys, signal
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
print(f"CHILD {child.pid}", flush=True)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def _child_pid(log: Path, tag: str = "CHILD") -> int:
    for _ in range(100):
        for line in log.read_text().splitlines():
            if line.startswith(tag + " "):
                return int(line.split()[1])
        time.sleep(0.05)
    raise AssertionError("stand-in did not report its child")


def test_death_during_startup_shows_log_tail(tmp_path):
    server = VllmServer(_plan(DIES, free_port()), tmp_path / "log", health_timeout=30)
    with pytest.raises(ServingError) as exc, server:
        pass
    assert "exited with code 3" in str(exc.value) and "ERROR boom: unsupported configuration" in str(exc.value)


def test_health_timeout_stops_the_whole_group(tmp_path):
    log = tmp_path / "log"
    server = VllmServer(_plan(NEVER_HEALTHY, free_port()), log, health_timeout=1.5)
    t0 = time.monotonic()
    with pytest.raises(ServingError, match="not healthy after 2 s"):
        server.start()
        child = _child_pid(log)
        server.wait_healthy()
    assert time.monotonic() - t0 < 30
    assert not alive(server.process.pid) and not alive(child)


def test_port_in_use(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ServingError, match=f"cannot listen on 127.0.0.1:{port}"):
            VllmServer(_plan(HEALTHY, port), tmp_path / "log").start()


def test_sigterm_is_forwarded_and_nothing_left(tmp_path):
    """run_plan in the main thread; SIGTERM to this process once healthy: the stand-in and its
    grandchild are gone when run_plan returns, and the result says why it stopped."""
    log = tmp_path / "log"
    ready: list[float] = []

    def on_ready(plan, startup, log_path):
        ready.append(startup)
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()

    before = signal.getsignal(signal.SIGTERM)
    result = run_plan(_plan(HEALTHY, free_port()), health_timeout=30, log_path=log, on_ready=on_ready)
    assert ready and result.stopped_by == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
    assert not alive(_child_pid(log))


# A stand-in that answers 200 to every GET from a background thread (the scripts below add their fate).
OK_IN_BACKGROUND = """
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def log_message(self, *a): pass
srv = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H)
threading.Thread(target=srv.serve_forever, daemon=True).start()
"""

HEALTHY_THEN_DIES = """
import http.server, sys, threading, time
""" + OK_IN_BACKGROUND + """time.sleep(1.5)
print("fatal: engine died", flush=True)
sys.exit(9)
"""


def test_unexpected_death_while_serving_is_an_error(tmp_path):
    with pytest.raises(ServingError, match="(?s)exited unexpectedly \\(code 9\\).*fatal: engine died"):
        run_plan(_plan(HEALTHY_THEN_DIES, free_port()), health_timeout=30, log_path=tmp_path / "log")


# Like vLLM with VLLM_KEEP_ALIVE_ON_ENGINE_DEATH=1: healthy, then the engine "dies" (after the
# first /health or after a signal file appears): /health answers 503, every other request 500, and the
# process (and its grandchild) stays alive until stopped.
ENGINE_DIES_SERVER_STAYS = """
import http.server, os, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
print(f"CHILD {child.pid}", flush=True)
dead = []
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if not dead and os.path.exists(sys.argv[2]):
            print("ERROR EngineCore died: RuntimeError: einsum(): subscript b has size 3", flush=True)
            dead.append(1)
        if self.path == "/health":
            self.send_response(503 if dead else 200)
        else:
            self.send_response(500 if dead else 200)
        self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""

# Healthy, then the HTTP server stops answering (socket closed) while the process lives on.
STOPS_ANSWERING = """
import http.server, os, sys, threading, time
print(f"SERVER {os.getpid()}", flush=True)
""" + OK_IN_BACKGROUND + """while not os.path.exists(sys.argv[2]):
    time.sleep(0.05)
srv.shutdown(); srv.server_close()
print("api server hung", flush=True)
time.sleep(300)
"""


def _plan_with_trigger(code: str, port: int, trigger: Path) -> LaunchPlan:
    plan = _plan(code, port)
    return LaunchPlan((*plan.argv, str(trigger)), {}, plan.url, plan.served_names, 8, plan.host, port)


@pytest.mark.timeout(120)  # on failure (the watch never fires) run_plan would serve forever
def test_dead_engine_behind_a_live_server_stops_serving(tmp_path):
    """/health turns 503 while the process stays up: run_plan stops the whole group and raises with
    the reason and the log tail instead of serving HTTP 500 for ever."""
    log, trigger = tmp_path / "log", tmp_path / "die"

    def on_ready(plan, startup, log_path):
        trigger.touch()

    with pytest.raises(ServingError) as exc:
        run_plan(_plan_with_trigger(ENGINE_DIES_SERVER_STAYS, free_port(), trigger), health_timeout=30,
                 log_path=log, on_ready=on_ready, watch_policy=WatchPolicy(interval=0.2))
    msg = str(exc.value)
    assert "engine is dead: /health answered 503 on 2 polls in a row" in msg
    assert "ERROR EngineCore died: RuntimeError" in msg  # the log tail
    assert "start `pissa serve` again" in exc.value.fix
    assert not alive(_child_pid(log))


@pytest.mark.timeout(120)
def test_server_that_stops_answering_is_stopped(tmp_path):
    """The HTTP side goes away while the process lives on: stopped after the stated silent polls."""
    log, trigger = tmp_path / "log", tmp_path / "hang"

    def on_ready(plan, startup, log_path):
        trigger.touch()

    with pytest.raises(ServingError, match="(?s)stopped answering: no healthy /health on 5 polls.*api server hung"):
        run_plan(_plan_with_trigger(STOPS_ANSWERING, free_port(), trigger), health_timeout=30, log_path=log,
                 on_ready=on_ready, watch_policy=WatchPolicy(interval=0.2, probe_timeout=1, silent_polls=5))
    assert not alive(_child_pid(log, "SERVER"))


def test_probe_health_reads_vllms_answers(tmp_path):
    """200 → OK, 503 → DEAD (vLLM's EngineDeadError), and the stand-in's 500 on other paths → SILENT."""
    import subprocess

    from serving.watch import Health, probe_health

    port, trigger = free_port(), tmp_path / "die"
    server = VllmServer(_plan_with_trigger(ENGINE_DIES_SERVER_STAYS, port, trigger), tmp_path / "log", health_timeout=30)
    with server:
        url = server.plan.url
        assert probe_health(url + "/health", 5) == (Health.OK, "200")
        trigger.touch()
        assert probe_health(url + "/health", 5) == (Health.DEAD, "503")
        assert probe_health(url + "/v1/models", 5) == (Health.SILENT, "HTTP 500")
    assert isinstance(server.process, subprocess.Popen) and server.process.poll() is not None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_server_dies_when_the_launcher_is_killed(tmp_path):
    """SIGKILL to the launching process (no chance to forward anything): the server still stops."""
    import subprocess

    log = tmp_path / "log"
    port = free_port()
    launcher = textwrap.dedent(f"""
        import sys, time, textwrap
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from test_serving_launcher import HEALTHY, _plan
        from serving.launcher import VllmServer
        server = VllmServer(_plan(HEALTHY, {port}), Path({str(log)!r}), health_timeout=30)
        server.start(); server.wait_healthy()
        print("SERVER", server.process.pid, flush=True)
        time.sleep(300)
    """)
    proc = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("SERVER"), line
    server_pid = int(line.split()[1])
    assert alive(server_pid)
    proc.kill()
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        assert not alive(server_pid)
    finally:
        proc.stdout.close()
        # The stand-in (unlike vLLM) does not stop its own child on SIGTERM: clean its group up.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server_pid, signal.SIGKILL)


def test_tail(tmp_path):
    p = tmp_path / "x.log"
    p.write_text("".join(f"line {i}\n" for i in range(100)))
    assert tail(p, 3) == "line 97\nline 98\nline 99"
    assert tail(tmp_path / "missing") == ""


@pytest.mark.vllm
def test_real_vllm_startup_failure_is_one_clear_error(tmp_path, tiny_llama, capsys):
    """vLLM refuses an unknown flag: `pissa serve` exits 1 with vLLM's own complaint in the message."""
    from pissa.cli import run

    manifest = tmp_path / "serve.yaml"
    manifest.write_text(f"base:\n  path: {tiny_llama}\nvllm:\n  port: {free_port()}\n  kv_cache_memory_bytes: 64M\n"
                        "  health_timeout: 120\nextra_args: [--no-such-vllm-flag]\n")
    code = run(["serve", str(manifest), "--log-file", str(tmp_path / "vllm.log")])
    err = capsys.readouterr().err
    assert code == 1
    assert "vLLM exited with code" in err and "--no-such-vllm-flag" in err


@pytest.mark.vllm
@pytest.mark.timeout(600)
@pytest.mark.parametrize("keep_alive", ["0", "1"], ids=["vllm-default", "VLLM_KEEP_ALIVE_ON_ENGINE_DEATH=1"])
def test_real_engine_killed_pissa_serve_exits(tmp_path, tiny_llama, keep_alive):
    """SIGKILL to vLLM's engine core while `pissa serve` serves: it exits 1 with one clear line and the
    log tail, and leaves no process. vLLM 0.32 alone answers 503/500 and then stops itself (code 0) by
    default; with VLLM_KEEP_ALIVE_ON_ENGINE_DEATH=1 it would answer 500 until stopped, so there only
    the watch ends it."""
    import subprocess

    port = free_port()
    out_path = tmp_path / "pissa-serve.out"
    env = {**os.environ, "VLLM_KEEP_ALIVE_ON_ENGINE_DEATH": keep_alive}
    with open(out_path, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pissa", "serve", "--base", str(tiny_llama), "--dtype", "float32",
             "--kv-cache", "64M", "--port", str(port), "--log-file", str(tmp_path / "vllm.log")],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        while "vLLM is up" not in out_path.read_text():
            assert proc.poll() is None, "pissa serve did not come up:\n" + out_path.read_text()[-3000:]
            time.sleep(0.5)
        (api,) = children(proc.pid)
        spawned = descendants(proc.pid)
        engines = [pid for pid, name in children(api).items() if "EngineCore" in name]
        assert len(engines) == 1, children(api)
        os.kill(engines[0], signal.SIGKILL)
        t_kill = time.monotonic()
        code = proc.wait(timeout=60)  # the bound: it must not keep serving
        first = next((line for line in out_path.read_text().splitlines() if line.startswith("error")), "")
        print(f"pissa serve exited {code} {time.monotonic() - t_kill:.1f} s after the engine was killed: {first}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
    text = out_path.read_text()
    assert code == 1, text[-3000:]
    assert ("vLLM's engine is dead: /health answered 503 on 2 polls in a row" in text
            or "vLLM exited unexpectedly (code 0) after /health answered 503 (its engine died)" in text), text[-3000:]
    if keep_alive == "1":
        assert "vLLM's engine is dead" in text, text[-3000:]
    assert "last lines of" in text and "EngineCore" in text  # the log tail names the dead engine
    assert "start `pissa serve` again" in text
    time.sleep(0.5)
    left = [p for p in spawned if alive(p)]
    assert not left, f"processes left behind: {left}"
