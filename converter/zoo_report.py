"""The zoo's summary: one row per (entry, rank), written as ``zoo-report.json`` and ``zoo-report.md``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pissa.core.jsonio import write_json, write_text

REPORT_JSON = "zoo-report.json"
REPORT_MD = "zoo-report.md"

# status of a job: what happened to its bundle
CONVERTED = "converted"  # converted from scratch
RESUMED = "resumed"  # an interrupted conversion was finished (some shards reused)
SKIPPED = "skipped"  # already complete: checksums verified, options unchanged
FAILED = "failed"


@dataclass(frozen=True)
class JobResult:
    """Outcome of one (entry, rank) job.

    Attributes:
        entry, rank: which job.
        status: ``converted``, ``resumed``, ``skipped`` or ``failed``.
        seconds: wall time of the job in this run.
        out: the bundle folder.
        bytes: bundle size (0 when failed).
        matrices: converted matrices.
        mean_energy, worst_energy: adapter energy share over the matrices (None when failed).
        repo_id: push target (None when not pushed).
        pushed: ``uploaded`` / ``unchanged`` / ``failed`` / None (not pushed).
        error: one line per problem, when failed.
        rank_of_world: the torchrun rank that ran it.
    """

    entry: str
    rank: int
    status: str
    seconds: float
    out: str
    bytes: int = 0
    matrices: int = 0
    mean_energy: float | None = None
    worst_energy: float | None = None
    repo_id: str | None = None
    pushed: str | None = None
    error: str | None = None
    rank_of_world: int = 0

    @property
    def ok(self) -> bool:
        return self.status != FAILED and self.pushed != FAILED


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


HEADERS = ["entry", "rank", "status", "time", "size", "mean energy", "worst energy", "push", "error"]


def rows(results: list[JobResult]) -> list[list[str]]:
    """Table rows (strings) in manifest order."""

    def energy(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    return [
        [
            r.entry,
            str(r.rank),
            r.status,
            f"{r.seconds:.1f} s",
            human_bytes(r.bytes) if r.bytes else "-",
            energy(r.mean_energy),
            energy(r.worst_energy),
            f"{r.pushed} {r.repo_id}" if r.pushed else "-",
            (r.error or "").splitlines()[0] if r.error else "",
        ]
        for r in results
    ]


def markdown(results: list[JobResult], summary: dict[str, Any]) -> str:
    lines = [
        f"# Zoo report: {summary['manifest']}",
        "",
        f"{summary['ok_jobs']} of {summary['jobs']} jobs succeeded in {summary['seconds']:.1f} s "
        f"({summary['world_size']} process(es)); bundles under `{summary['root']}`.",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "|".join("---" for _ in HEADERS) + "|",
    ]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows(results)]
    failed = [r for r in results if not r.ok]
    if failed:
        lines += ["", "## Failures", ""]
        for r in failed:
            lines.append(f"- **{r.entry} r{r.rank}**: " + (r.error or "").replace("\n", "; "))
    return "\n".join(lines) + "\n"


def write_reports(root: Path, results: list[JobResult], summary: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``zoo-report.json`` and ``zoo-report.md`` under ``root`` (each by an atomic rename)."""
    root.mkdir(parents=True, exist_ok=True)
    payload = {**summary, "results": [asdict(r) for r in results]}
    json_path, md_path = root / REPORT_JSON, root / REPORT_MD
    write_json(json_path, payload)
    write_text(md_path, markdown(results, summary))
    return json_path, md_path
