"""Watch a serving vLLM: decide from ``/health`` polls and the server's exit whether it is dead.

What vLLM 0.32 does when its engine core dies (read in its sources and seen on CPU): the API server's
engine monitor marks the engine dead at once, ``GET /health`` then answers **503**
(``vllm/entrypoints/serve/instrumentator/health.py``: ``EngineDeadError`` → 503) and never 200 again
(``engine_dead`` is never reset), and every request gets HTTP 500. The API server then shuts itself
down on the next failed request or within its 5 s watchdog tick (``terminate_if_errored`` in
``vllm/entrypoints/launchers/launcher.py``), exiting with code 0 — unless
``VLLM_KEEP_ALIVE_ON_ENGINE_DEATH=1``, where it keeps answering 500 until stopped.

So the watch ends serving when, whichever comes first:

- the API server process exits (any code: serving was not asked to stop);
- ``/health`` answers 503 on :attr:`WatchPolicy.dead_polls` (2) polls in a row: vLLM's own verdict that
  the engine is dead, which is terminal; the second poll only confirms it (one interval, ~1 s);
- ``/health`` gives no answer (refused, timed out, or a status other than 200/503) on
  :attr:`WatchPolicy.silent_polls` (15) polls in a row: 15–90 s with the defaults (1 s apart, 5 s
  timeout each). Long on purpose: a loaded server on few cores can be slow to answer, and a server
  that is shutting itself down closes its port a moment before it exits.

:func:`judge` is the decision (observations in, verdict out, no IO); :func:`watch` is the loop.
"""

from __future__ import annotations

import enum
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass


class Health(enum.Enum):
    OK = "ok"  # 200
    DEAD = "dead"  # 503: vLLM's EngineDeadError
    SILENT = "silent"  # no answer, or another status


@dataclass(frozen=True)
class Observation:
    """One poll: the server process's exit code (None while it runs) and what ``/health`` said."""

    exit_code: int | None
    health: Health
    detail: str = ""


@dataclass(frozen=True)
class WatchPolicy:
    """How often to poll and how many failed polls in a row end serving (see the module docstring)."""

    interval: float = 1.0
    probe_timeout: float = 5.0
    dead_polls: int = 2
    silent_polls: int = 15

    def __post_init__(self) -> None:
        if self.interval <= 0 or self.probe_timeout <= 0 or self.dead_polls < 1 or self.silent_polls < 1:
            raise ValueError(f"invalid watch policy: {self}")


@dataclass(frozen=True)
class Verdict:
    """Why the server is considered dead; ``exit_code`` is set when the process itself exited."""

    reason: str
    exit_code: int | None = None


def judge(observations: Sequence[Observation], policy: WatchPolicy) -> Verdict | None:
    """The verdict on a server from its polls, oldest first; None while it is to be trusted.

    Only the trailing run of polls since the last 200 counts. Dead if the last poll saw the process
    exit, or the last ``dead_polls`` were all 503, or the last ``silent_polls`` were all failures.
    """
    if not observations:
        return None
    last = observations[-1]
    run: list[Observation] = []  # the polls since the last 200, newest first
    for obs in reversed(observations):
        if obs.health is Health.OK:
            break
        run.append(obs)
    if last.exit_code is not None:
        after = " after /health answered 503 (its engine died)" if any(o.health is Health.DEAD for o in run) else ""
        return Verdict(f"vLLM exited unexpectedly (code {last.exit_code}){after}", last.exit_code)
    if len(run) >= policy.dead_polls and all(o.health is Health.DEAD for o in run[: policy.dead_polls]):
        return Verdict(f"vLLM's engine is dead: /health answered 503 on {policy.dead_polls} polls in a row")
    if len(run) >= policy.silent_polls:
        return Verdict(f"vLLM stopped answering: no healthy /health on {policy.silent_polls} polls in a row "
                       f"(last: {last.detail or last.health.value})")
    return None


def probe_health(url: str, timeout: float) -> tuple[Health, str]:
    """``GET url`` once: 200 → OK, 503 → DEAD, anything else (or no answer) → SILENT, with a detail."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            status = int(r.status)
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return Health.SILENT, f"no answer: {reason}"
    if status == 200:
        return Health.OK, "200"
    if status == 503:
        return Health.DEAD, "503"
    return Health.SILENT, f"HTTP {status}"


def watch(
    exit_code: Callable[[], int | None],
    probe: Callable[[], tuple[Health, str]],
    policy: WatchPolicy,
    *,
    wait: Callable[[float], None],
    stop_requested: Callable[[], bool] = lambda: False,
) -> Verdict | None:
    """Poll until :func:`judge` gives a verdict (returned) or a stop is requested (None).

    Args:
        exit_code: the server process's exit code, None while it runs (``Popen.poll``).
        probe: one ``/health`` poll (:func:`probe_health`).
        policy: interval and thresholds.
        wait: waits up to ``policy.interval`` between polls; may return early (e.g. when the process
            exits: ``Popen.wait`` with a timeout).
        stop_requested: True once serving is to end on request (a forwarded signal).
    """
    history: deque[Observation] = deque(maxlen=max(policy.dead_polls, policy.silent_polls))
    while not stop_requested():
        code = exit_code()
        if code is None:
            health, detail = probe()
            code = exit_code()  # it may have exited while the probe waited
        if code is not None:
            health, detail = Health.SILENT, "process exited"
        history.append(Observation(code, health, detail))
        if stop_requested():
            return None
        verdict = judge(history, policy)
        if verdict is not None:
            return verdict
        wait(policy.interval)
    return None
