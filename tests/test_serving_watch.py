"""The watch's decision (:func:`serving.watch.judge`) on sequences of polls, and its loop on scripted
probes (no processes, no sockets)."""

from __future__ import annotations

import pytest

from serving.watch import Health, Observation, Verdict, WatchPolicy, judge, probe_health, watch

OK, DEAD, SILENT = Health.OK, Health.DEAD, Health.SILENT
POLICY = WatchPolicy(interval=0.01, dead_polls=2, silent_polls=4)


def _obs(*healths: Health, exit_code: int | None = None) -> list[Observation]:
    out = [Observation(None, h, h.value) for h in healths]
    if exit_code is not None:
        out.append(Observation(exit_code, SILENT, "process exited"))
    return out


@pytest.mark.parametrize("healths", [(), (OK,), (OK, OK, OK), (DEAD,), (OK, DEAD), (DEAD, OK),
                                     (DEAD, OK, DEAD), (SILENT, SILENT, SILENT), (OK, SILENT, SILENT, SILENT),
                                     (SILENT, DEAD), (DEAD, SILENT), (SILENT, SILENT, OK, SILENT)])
def test_trusted(healths):
    assert judge(_obs(*healths), POLICY) is None


def test_exit_is_dead_at_once_whatever_health_said():
    for code in (0, 1, -9):
        v = judge(_obs(OK, OK, exit_code=code), POLICY)
        assert v == Verdict(f"vLLM exited unexpectedly (code {code})", code)


def test_exit_after_503_says_the_engine_died():
    """vLLM 0.32 exits (code 0) on its own soon after its engine dies: the verdict names the cause."""
    v = judge(_obs(OK, DEAD, exit_code=0), POLICY)
    assert v == Verdict("vLLM exited unexpectedly (code 0) after /health answered 503 (its engine died)", 0)
    assert judge(_obs(DEAD, OK, exit_code=0), POLICY) == Verdict("vLLM exited unexpectedly (code 0)", 0)


@pytest.mark.parametrize("healths", [(DEAD, DEAD), (OK, DEAD, DEAD), (SILENT, DEAD, DEAD), (OK, SILENT, DEAD, DEAD)])
def test_503_twice_in_a_row_is_a_dead_engine(healths):
    v = judge(_obs(*healths), POLICY)
    assert v is not None and "engine is dead" in v.reason and "503 on 2 polls" in v.reason and v.exit_code is None


@pytest.mark.parametrize("healths", [(SILENT,) * 4, (OK,) + (SILENT,) * 4, (SILENT, DEAD, SILENT, SILENT),
                                     (DEAD, SILENT, SILENT, SILENT)])
def test_long_silence_is_dead(healths):
    v = judge(_obs(*healths), POLICY)
    assert v is not None and "stopped answering" in v.reason and "4 polls" in v.reason


def test_thresholds_follow_the_policy():
    assert judge(_obs(DEAD, DEAD), WatchPolicy(dead_polls=3)) is None
    assert judge(_obs(DEAD, DEAD, DEAD), WatchPolicy(dead_polls=3)) is not None
    assert judge(_obs(DEAD), WatchPolicy(dead_polls=1)) is not None
    assert judge(_obs(*(SILENT,) * 14), WatchPolicy()) is None
    assert judge(_obs(*(SILENT,) * 15), WatchPolicy()) is not None


def test_silent_verdict_names_the_last_failure():
    obs = [Observation(None, SILENT, "no answer: [Errno 111] Connection refused")] * 4
    v = judge(obs, POLICY)
    assert v is not None and "Connection refused" in v.reason


@pytest.mark.parametrize("bad", [dict(interval=0), dict(probe_timeout=-1), dict(dead_polls=0), dict(silent_polls=0)])
def test_policy_refuses_nonsense(bad):
    with pytest.raises(ValueError):
        WatchPolicy(**bad)


class Script:
    """Scripted server: the health answers in turn (the last repeats), and an exit code from poll ``exit_at``."""

    def __init__(self, healths: list[Health], exit_at: int | None = None, code: int = 0) -> None:
        self.healths, self.exit_at, self.code = healths, exit_at, code
        self.probes = 0
        self.waits: list[float] = []

    def exit_code(self) -> int | None:
        return self.code if self.exit_at is not None and self.probes >= self.exit_at else None

    def probe(self) -> tuple[Health, str]:
        h = self.healths[min(self.probes, len(self.healths) - 1)]
        self.probes += 1
        return h, h.value


def test_watch_returns_on_503_after_the_stated_polls():
    s = Script([OK, OK, OK, DEAD])
    v = watch(s.exit_code, s.probe, POLICY, wait=s.waits.append)
    assert v is not None and "engine is dead" in v.reason
    assert s.probes == 5  # 3 healthy + 2 dead
    assert s.waits == [POLICY.interval] * 4


def test_watch_returns_on_exit_seen_after_a_probe():
    s = Script([OK], exit_at=3, code=7)
    v = watch(s.exit_code, s.probe, POLICY, wait=s.waits.append)
    assert v == Verdict("vLLM exited unexpectedly (code 7)", 7) and s.probes == 3


def test_watch_returns_none_on_request():
    s = Script([OK])
    stop = iter([False, False, False, True])
    assert watch(s.exit_code, s.probe, POLICY, wait=s.waits.append, stop_requested=lambda: next(stop)) is None


def test_watch_ignores_a_verdict_that_follows_a_stop_request():
    """A signal makes vLLM exit: that exit is the requested stop, not a death."""
    s = Script([OK], exit_at=0, code=0)
    calls = iter([False, True])
    assert watch(s.exit_code, s.probe, POLICY, wait=s.waits.append, stop_requested=lambda: next(calls)) is None


def test_probe_health_without_a_server():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connection refused
        health, detail = probe_health(f"http://127.0.0.1:{port}/health", timeout=2)
    assert health is SILENT and detail.startswith("no answer")
