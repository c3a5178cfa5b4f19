"""``pissa zoo``: convert, verify and optionally push every (entry, rank) of a zoo manifest.

Jobs are the (entry, rank) pairs in manifest order. For each job, into ``ROOT/<name>/r<rank>/``:

1. a finished bundle whose files match its recorded checksums and whose recorded options and
   source are the job's is **skipped**; one that does not (damaged, or the manifest changed) is
   converted again from scratch;
2. otherwise ``convert(..., resume=True)``: an interrupted conversion continues with the shards it
   had finished (``converter.convert`` keeps them in ``.r<rank>.partial/`` and installs the bundle
   by one rename, so a half-written bundle never sits at the job's path);
3. the new bundle is verified (``verify_bundle``);
4. with ``push``, it is pushed (``converter.push.push``: idempotent, a re-run uploads nothing new).

A failing job is recorded (status ``failed`` with its error lines) and the next one runs. The
report (``zoo-report.json`` + ``zoo-report.md`` under ROOT) lists every job.

Parallelism: ``workers`` jobs at a time in spawned processes on this machine, and under
``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1) rank ``k`` of ``W`` takes the jobs
``i`` with ``i % W == k``; the ranks exchange their results over a gloo process group and rank 0
writes the report. While the ranks work they exchange heartbeats (:mod:`converter.ranks`), so a
rank that dies (killed, out of memory) stops the others within seconds (they start no new job)
instead of leaving them waiting for its results; the zoo then fails on every rank and a rerun
resumes it. Each conversion itself runs in one process (the zoo parallelises over jobs), and
the conversions are deterministic, so the bundles are the same whatever the split.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from converter.options import ConvertOptions
from converter.ranks import Ranks
from converter.zoo_manifest import ZooManifest, load_zoo_manifest, resolve_embedded
from converter.zoo_report import CONVERTED, FAILED, RESUMED, SKIPPED, JobResult, write_reports
from pissa.core.errors import (
    InvalidOptionsError,
    OutputBusyError,
    PissaError,
    StoppedError,
    VerificationError,
    format_problems,
)
from pissa.core.formats import bundle as B
from pissa.core.outputs import check_not_a_file

logger = logging.getLogger(__name__)

# Root of the bundles when neither --out nor the manifest's ``out`` says.
DEFAULT_ROOT = "zoo-out"


@dataclass(frozen=True)
class ZooJob:
    """One (entry, rank): everything a worker process needs (picklable)."""

    index: int
    entry: str
    rank: int
    source: str
    options: ConvertOptions
    out: str
    repo_id: str | None = None
    private: bool = False
    push: bool = False
    progress: bool = False


@dataclass(frozen=True)
class ZooReport:
    """What a zoo run did (``results`` in manifest order, across every torchrun rank)."""

    manifest: str
    root: Path
    results: tuple[JobResult, ...]
    seconds: float
    world_size: int
    rank: int
    report_json: Path | None
    report_md: Path | None

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def failed(self) -> list[JobResult]:
        return [r for r in self.results if not r.ok]


def plan_jobs(
    manifest: ZooManifest,
    root: Path,
    *,
    only: Sequence[str] = (),
    push: bool = False,
    threads: int = 0,
) -> list[ZooJob]:
    """Every (entry, rank) job of ``manifest`` (restricted to ``only`` names), in manifest order.

    Raises:
        InvalidOptionsError: ``only`` names an entry that is not in the manifest.
    """
    unknown = [n for n in only if n not in manifest.names()]
    if unknown:
        raise InvalidOptionsError(
            "unknown --only name(s)",
            [f"--only {n!r}: no such entry in {manifest.path}" for n in unknown],
            fix=f"choose among: {', '.join(manifest.names())}",
        )
    jobs: list[ZooJob] = []
    for entry in manifest.entries:
        if only and entry.name not in only:
            continue
        for rank in entry.ranks:
            jobs.append(
                ZooJob(
                    index=len(jobs),
                    entry=entry.name,
                    rank=rank,
                    source=entry.source,
                    options=entry.options(rank, threads=threads),
                    out=str(root / entry.name / f"r{rank}"),
                    repo_id=entry.repo_id(rank),
                    private=entry.private,
                    push=push and entry.push is not None,
                )
            )
    return jobs


# --- one job ------------------------------------------------------------------------------------
@contextlib.contextmanager
def _job_lock(out: Path) -> Iterator[None]:
    """Hold ``.<name>.lock`` next to the bundle: two zoo runs never write the same bundle at once.

    Raises:
        OutputBusyError: another process holds the lock (its pid is in the message).
    """
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out.parent / f".{out.name}.lock"
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            raise OutputBusyError(
                str(out), fix=f"another zoo run (pid {holder}) is on it: let it finish, or use another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _source_identity(text: str) -> set[str]:
    text = text.removeprefix("hub:")
    return {text, os.path.realpath(text)} if text else set()


def reuse_problems(bundle: Path, job: ZooJob, source: str) -> list[str]:
    """Why the finished bundle at ``bundle`` cannot stand for ``job`` (empty: it can).

    Checks every recorded file's sha256, that the recorded content options
    (:meth:`ConvertOptions.content_record`, the converter's own resume fingerprint) equal the job's,
    and that the recorded source (path or repo id) is the job's. A content option the record lacks
    (a bundle from a version without it) is not compared.
    """
    from converter.verify import check_files

    try:
        record = B.read_record(bundle)
    except (OSError, ValueError) as exc:
        return [f"pissa.json unreadable: {exc}"]
    problems = list(check_files(bundle, record))
    problems += [f"option {change} in the manifest" for change in job.options.content_changes(record.get("options", {}))]
    src = record.get("source", {})
    known = {str(v) for k, v in src.items() if k in ("path", "repo_id") and v}
    if src.get("repo_id") and src.get("file"):  # hub:ORG/NAME/FILE.gguf
        known.add(f"{src['repo_id']}/{src['file']}")
    known |= {os.path.realpath(v) for v in known}
    if known and not (known & _source_identity(source)):
        problems.append(f"converted from {sorted(known)[0]}, the manifest now says {source}")
    return problems


def _describe(exc: BaseException) -> str:
    if isinstance(exc, PissaError):
        return "\n".join(line.removeprefix("error: ") for line in format_problems(exc))
    return f"{type(exc).__name__}: {exc}"


def run_job(job: ZooJob) -> JobResult:
    """Convert → verify → (push) one job; never raises for a failure of the job itself.

    Returns:
        its :class:`JobResult` (``failed`` with the error lines when any step failed).
    """
    from converter.convert import convert, report_from_record
    from converter.verify import verify_bundle

    start = time.perf_counter()
    out = Path(job.out)
    status = FAILED
    report = None
    try:
        source = resolve_embedded(job.source)
        with _job_lock(out):
            if (out / B.RECORD).exists():
                problems = reuse_problems(out, job, source)
                if not problems:
                    report = report_from_record(out, B.read_record(out))
                    status = SKIPPED
                else:
                    logger.warning("%s r%d: converting again (%s)", job.entry, job.rank, "; ".join(problems))
                    report = convert(source, out, job.options, overwrite=True, progress=job.progress, distributed=False)
                    status = CONVERTED
            else:
                report = convert(source, out, job.options, resume=True, progress=job.progress, distributed=False)
                status = RESUMED if report.shards_reused > 0 else CONVERTED
        if status != SKIPPED:
            verified = verify_bundle(out)
            if getattr(verified, "problems", None):
                raise VerificationError(f"{out} does not verify", list(verified.problems))
    except Exception as exc:  # noqa: BLE001 - isolate the failure, report it, go on
        logger.error("%s r%d failed: %s", job.entry, job.rank, _describe(exc).replace("\n", "; "))
        return JobResult(
            job.entry, job.rank, FAILED, time.perf_counter() - start, job.out, error=_describe(exc),
            repo_id=job.repo_id, rank_of_world=_world_rank(),
        )
    result = JobResult(
        entry=job.entry,
        rank=job.rank,
        status=status,
        seconds=0.0,
        out=job.out,
        bytes=report.output_bytes,
        matrices=report.matrices,
        mean_energy=report.mean_energy,
        worst_energy=report.min_energy,
        repo_id=job.repo_id,
        rank_of_world=_world_rank(),
    )
    if job.push and job.repo_id:
        from converter.push import push

        try:
            pushed = push(out, job.repo_id, private=job.private)
            result = replace(result, pushed="uploaded" if pushed.uploaded else "unchanged")
        except Exception as exc:  # noqa: BLE001 - the bundle is fine; the push is reported as failed
            logger.error("%s r%d: push to %s failed: %s", job.entry, job.rank, job.repo_id, _describe(exc))
            result = replace(result, pushed=FAILED, error=_describe(exc))
    logger.info("%s r%d: %s", job.entry, job.rank, result.status)
    return replace(result, seconds=time.perf_counter() - start)


# --- distribution -------------------------------------------------------------------------------
def _world_rank() -> int:
    return int(os.environ.get("RANK", "0"))


# --- driver -------------------------------------------------------------------------------------
def _outcome(job: ZooJob, future: Any) -> JobResult:
    """The worker's result, or a failed result when the worker process itself died (OOM, signal)."""
    try:
        result: JobResult = future.result()
        return result
    except Exception as exc:  # noqa: BLE001 - e.g. BrokenProcessPool: the job failed, the zoo goes on
        return JobResult(job.entry, job.rank, FAILED, 0.0, job.out, repo_id=job.repo_id,
                         error=f"worker process failed: {type(exc).__name__}: {exc}", rank_of_world=_world_rank())


def _run_share(mine: list[ZooJob], workers: int, stop: threading.Event) -> list[tuple[int, JobResult]]:
    """This rank's jobs (here, or ``workers`` at a time in spawned processes); no new job once ``stop`` is set.

    Raises:
        StoppedError: ``stop`` was set (another rank was lost).
    """

    def stopped() -> StoppedError:
        return StoppedError("the zoo stopped: another rank failed", fix="rerun the zoo: finished bundles are skipped")

    if workers > 1 and len(mine) > 1:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(mine)), mp_context=ctx) as pool:
            futures = [(j, pool.submit(run_job, j)) for j in mine]
            pending = {fut for _, fut in futures}
            while pending:
                _, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                if stop.is_set():
                    for fut in pending:
                        fut.cancel()
                    raise stopped()
            return [(j.index, _outcome(j, fut)) for j, fut in futures]
    results = []
    for job in mine:
        if stop.is_set():
            raise stopped()
        results.append((job.index, run_job(job)))
    return results


def run_zoo(
    manifest: str | Path,
    *,
    out: str | Path | None = None,
    only: Sequence[str] = (),
    push: bool = False,
    workers: int = 1,
    progress: bool = True,
) -> ZooReport:
    """Run every job of the zoo ``manifest`` that falls to this process (see the module docstring).

    Args:
        manifest: the zoo manifest (YAML).
        out: root of the bundles (default: the manifest's ``out``, else :data:`DEFAULT_ROOT` under the working directory).
        only: run only these entries.
        push: push the entries that have a ``push`` target.
        workers: jobs run at a time on this machine (in spawned processes when > 1).
        progress: show each conversion's progress bar (one job at a time only).

    Returns:
        a :class:`ZooReport` with every job's result (all ranks'); rank 0 has written the reports.

    Raises:
        ManifestError: the manifest does not validate (every problem, with lines).
        InvalidOptionsError: bad ``workers`` or ``only``.
    """
    started = time.perf_counter()
    if workers < 1:
        raise InvalidOptionsError("invalid --workers", [f"--workers must be >= 1, got {workers}"])
    zoo = load_zoo_manifest(manifest)
    root = Path(out or zoo.out or DEFAULT_ROOT).expanduser().absolute()
    check_not_a_file(root)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = max(1, (os.cpu_count() or 1) // (workers * local_world)) if workers * local_world > 1 else 0
    jobs = plan_jobs(zoo, root, only=only, push=push, threads=threads)

    # A rank can wait a long time for the slowest one: the heartbeats of converter.ranks keep it
    # from timing out, and tell it within seconds when another rank dies.
    ranks = Ranks.join()
    rank, world = ranks.rank, ranks.world
    mine = [j for j in jobs if j.index % world == rank]
    if workers == 1 and world == 1 and progress:
        mine = [replace(j, progress=True) for j in mine]
    logger.info("zoo %s: %d job(s), %d for rank %d of %d", zoo.path, len(jobs), len(mine), rank, world)
    results = ranks.step(lambda stop: _run_share(mine, workers, stop))
    gathered = ranks.all_gather(results)
    everything = [r for _, r in sorted((item for part in gathered for item in part), key=lambda item: item[0])]

    seconds = time.perf_counter() - started
    summary = {
        "manifest": str(zoo.path),
        "root": str(root),
        "jobs": len(everything),
        "ok_jobs": sum(1 for r in everything if r.ok),
        "failed_jobs": sum(1 for r in everything if not r.ok),
        "seconds": round(seconds, 3),
        "world_size": world,
        "workers": workers,
        "only": list(only),
        "push": push,
    }
    # Rank 0 writes the reports; every rank returns once they are written (or fails with rank 0).
    json_path, md_path = ranks.step(lambda stop: write_reports(root, everything, summary) if rank == 0 else (None, None))
    ranks.close()
    return ZooReport(str(zoo.path), root, tuple(everything), seconds, world, rank, json_path, md_path)
