"""The ranks of a ``torchrun`` / ``accelerate launch`` run agree on how each step of the work ended.

A bare ``barrier()`` after a step is not enough: a rank whose step fails never reaches it, and the
others wait there until the process group's timeout (30 minutes for gloo, unless one is given);
``torchrun`` on one node then kills them mid-step, leaving half-written work behind. Instead, while
a step runs, every rank takes part in a *heartbeat*: a background thread all-gathers every rank's
state (running, done, stopped, failed) about ten times a second on a gloo group of its own.

- A rank whose step fails says so in the next heartbeat; the others are told to stop (the step's
  ``stop`` event: long work checks it) and say "stopped" once their step has returned, i.e. once
  they write nothing more. The heartbeats end when no rank is running, in the same round on every
  rank, so the ranks leave the step together and agree on its outcome (every rank's error lines
  are then gathered, so cleanup can depend on what went wrong).
- A rank that dies (killed, out of memory) closes its connections, and the next heartbeat fails on
  every other rank at once; a rank that hangs or a machine that vanishes is noticed after
  :data:`TIMEOUT`. Then the survivors stop their own step and report the lost rank.

After a failed step, :meth:`Ranks.step` runs the caller's ``cleanup`` as a step of its own (every
rank waits until, e.g., rank 0 has removed the staging folder), then raises on every rank: the rank
whose error it is re-raises it (the CLI prints it: one line, once, even when several ranks failed
alike), the others raise :class:`~pissa.core.errors.StoppedError`, which the CLI does not print, and
only after the reporting rank has exited (``torchrun`` kills the remaining ranks of a node as soon
as one exits non-zero, and must not kill the reporter before it has printed).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn, TypeVar

from pissa.core.errors import PissaError, StoppedError, format_problems

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long a heartbeat may wait for a rank that neither answers nor closes its connection (hung
# process, vanished machine); a killed process is noticed at once. Also the timeout of the process
# group this module creates, so a rank that dies before joining it cannot hang the others either.
TIMEOUT = timedelta(seconds=60)
HEARTBEAT_SECONDS = 0.1

RUNNING, DONE, STOPPED, FAILED = 0, 1, 2, 3


@dataclass(frozen=True)
class Failure:
    """One rank's failed step: the lines the CLI prints for it, and its exception type."""

    rank: int
    lines: tuple[str, ...]
    exit_code: int
    kind: type[BaseException]


@dataclass(frozen=True)
class Outcome:
    """How a step ended, the same on every rank (``lost`` aside: each survivor notices on its own)."""

    failures: tuple[Failure, ...] = ()
    lost: str | None = None

    @property
    def ok(self) -> bool:
        return not self.failures and self.lost is None

    def reporters(self) -> set[int]:
        """The ranks that report an error: the lowest rank for each distinct error."""
        seen: dict[tuple[str, ...], int] = {}
        for f in self.failures:
            seen.setdefault(f.lines, f.rank)
        return set(seen.values())


def _failure(rank: int, exc: BaseException) -> Failure:
    if isinstance(exc, PissaError):
        return Failure(rank, tuple(format_problems(exc)), exc.exit_code, type(exc))
    return Failure(rank, (f"error: {type(exc).__name__}: {exc}",), 130 if isinstance(exc, KeyboardInterrupt) else 1,
                   type(exc))


class Ranks:
    """This process's place in the run: ``rank`` of ``world``; :meth:`step` runs work in agreement.

    With ``world == 1`` a step is a plain call.
    """

    def __init__(self, rank: int = 0, world: int = 1, group: Any = None, created: bool = False) -> None:
        self.rank = rank
        self.world = world
        self._group = group
        self._created = created

    @classmethod
    def join(cls, distributed: bool = True) -> Ranks:
        """Join the run described by torchrun's environment (``WORLD_SIZE`` > 1), else a world of one.

        Creates the default process group (gloo, :data:`TIMEOUT`) unless the caller already has one,
        and a gloo group of its own for the heartbeats.
        """
        if not distributed or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        import torch.distributed as dist

        created = False
        if not dist.is_initialized():
            dist.init_process_group(backend="gloo", timeout=TIMEOUT)
            created = True
        group = dist.new_group(backend="gloo", timeout=TIMEOUT)
        return cls(dist.get_rank(), dist.get_world_size(), group, created)

    def close(self) -> None:
        """Leave the process groups this object made (after a successful run)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        dist.destroy_process_group(self._group)
        if self._created:
            dist.destroy_process_group()

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, by rank (call on every rank, after a step: it does not wait long)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, obj, group=self._group)
        return gathered

    def step(
        self,
        work: Callable[[threading.Event], T],
        cleanup: Callable[[Outcome], None] | None = None,
    ) -> T:
        """Run ``work(stop)`` on every rank and return its value once every rank's step succeeded.

        Args:
            work: this rank's share; long work should return (raising
                :class:`~pissa.core.errors.StoppedError`) soon after ``stop`` is set.
            cleanup: after a failed step, run on every rank (as a step of its own, so every rank
                waits for it) with the agreed outcome; skipped when a rank was lost.

        Raises:
            this rank's own error if it is the one reporting it; otherwise
            :class:`~pissa.core.errors.StoppedError` (also when a rank was lost).
        """
        value, error, outcome = self._run(work)
        if outcome.ok:
            return value  # type: ignore[return-value]
        if cleanup is not None and outcome.lost is None:
            _, cleanup_error, cleanup_outcome = self._run(lambda stop: cleanup(outcome))
            if not cleanup_outcome.ok:
                log.warning("cleanup after the failed step failed: %s", cleanup_outcome)
        self._raise(error, outcome)

    # --- internals ----------------------------------------------------------------------------
    def _run(self, work: Callable[[threading.Event], T]) -> tuple[T | None, BaseException | None, Outcome]:
        stop = threading.Event()
        if self.world == 1:
            try:
                return work(stop), None, Outcome()
            except BaseException as exc:  # noqa: BLE001 - reported through the outcome
                return None, exc, Outcome((_failure(0, exc),))
        state = [RUNNING]
        finished = threading.Event()
        heartbeat = _Heartbeat(self._group, self.world, state, stop, finished)
        heartbeat.start()
        value: T | None = None
        error: BaseException | None = None
        try:
            value = work(stop)
            state[0] = DONE
        except BaseException as exc:  # noqa: BLE001 - agreed with the other ranks below
            error = exc
            state[0] = STOPPED if isinstance(exc, StoppedError) else FAILED
        finished.set()
        heartbeat.join()
        if heartbeat.lost is not None:
            failures = (_failure(self.rank, error),) if state[0] == FAILED and error is not None else ()
            return value, error, Outcome(failures, heartbeat.lost)
        if all(s == DONE for s in heartbeat.states):
            return value, error, Outcome()
        mine = _failure(self.rank, error) if state[0] == FAILED and error is not None else None
        gathered: list[Any] = [None] * self.world
        import torch.distributed as dist

        try:
            dist.all_gather_object(gathered, mine, group=self._group)
        except RuntimeError as exc:
            return value, error, Outcome((mine,) if mine else (), f"gathering the errors failed: {exc}")
        return value, error, Outcome(tuple(f for f in gathered if f is not None))

    def _raise(self, error: BaseException | None, outcome: Outcome) -> NoReturn:
        if outcome.lost is not None:
            if error is not None and not isinstance(error, StoppedError):
                raise error
            raise StoppedError(
                f"rank {self.rank} of {self.world}: lost another rank ({outcome.lost})",
                fix="see the other ranks' logs (killed? out of memory?); --resume keeps the finished shards",
            )
        reporters = outcome.reporters()
        if error is not None and self.rank in reporters:
            raise error
        first = min(reporters)
        report = next(f for f in outcome.failures if f.rank == first)
        self._wait_for_exit(reporters)
        stopped = StoppedError(f"stopped: rank {first} of {self.world} failed: {report.lines[0].removeprefix('error: ')}")
        stopped.exit_code = report.exit_code
        stopped.already_reported = True
        raise stopped

    def _wait_for_exit(self, ranks: set[int]) -> None:
        """Return once the ``ranks`` have exited (their connections close) or after :data:`TIMEOUT`."""
        import torch
        import torch.distributed as dist

        for r in sorted(ranks):
            with contextlib.suppress(RuntimeError):  # the connection closed: that rank has exited
                work = dist.irecv(torch.zeros(1), src=r, group=self._group)
                if work is not None:
                    work.wait(TIMEOUT)


class _Heartbeat(threading.Thread):
    """All-gathers every rank's state each :data:`HEARTBEAT_SECONDS` until no rank is running."""

    def __init__(self, group: Any, world: int, state: list[int], stop: threading.Event,
                 finished: threading.Event) -> None:
        super().__init__(name="pissa-heartbeat", daemon=True)
        self._group = group
        self._world = world
        self._state = state
        self._stop_work = stop
        self._finished = finished
        self.states: list[int] = [RUNNING] * world
        self.lost: str | None = None

    def run(self) -> None:
        import torch
        import torch.distributed as dist

        while True:
            mine = torch.tensor([self._state[0]], dtype=torch.int64)
            out = [torch.zeros(1, dtype=torch.int64) for _ in range(self._world)]
            try:
                dist.all_gather(out, mine, group=self._group)
            except RuntimeError as exc:  # a rank died or hung: gloo raises at once or after TIMEOUT
                self.lost = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                log.debug("heartbeat failed: %s", exc)
                self._stop_work.set()
                return
            self.states = [int(t.item()) for t in out]
            if any(s in (FAILED, STOPPED) for s in self.states):
                self._stop_work.set()
            if all(s != RUNNING for s in self.states):
                return
            self._finished.wait(HEARTBEAT_SECONDS)
