"""``pissa zoo MANIFEST``: parse options, call :func:`converter.zoo.run_zoo`, print the summary table."""

from __future__ import annotations

import click

from converter.zoo import DEFAULT_ROOT, run_zoo
from pissa.commands.common import default_of, table


@click.command("zoo")
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--out", default=default_of(run_zoo, "out"),
              help=f"Root of the bundles (default: the manifest's `out`, else ./{DEFAULT_ROOT}).")
@click.option("--only", multiple=True, help="Run only this entry (repeatable).")
@click.option("--push", is_flag=True, help="Push every bundle whose entry has a `push` target.")
@click.option("--workers", type=int, default=default_of(run_zoo, "workers"), show_default=True,
              help="Jobs (entry × rank) run at a time on this machine.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def zoo(manifest: str, out: str | None, only: tuple[str, ...], push: bool, workers: int, quiet: bool) -> None:
    """Convert, verify (and push) every entry × rank of a zoo MANIFEST; resumable, failures isolated.

    Run it under `torchrun --nproc-per-node N` (or one torchrun job per node) to split the jobs
    across processes and machines; rank 0 writes ROOT/zoo-report.json and zoo-report.md.
    """
    from converter.alloc import tune_allocator
    from converter.zoo_report import HEADERS, rows
    from pissa.core.errors import ZooError

    tune_allocator()

    report = run_zoo(manifest, out=out, only=only, push=push, workers=workers, progress=not quiet)
    if report.rank != 0:
        return
    click.echo(table(HEADERS, rows(list(report.results))))
    click.echo(f"report: {report.report_json} and {report.report_md.name if report.report_md else ''}")
    if not report.ok:
        raise ZooError(
            f"{len(report.failed)} of {len(report.results)} zoo jobs failed",
            [f"{r.entry} r{r.rank}: {(r.error or '').replace(chr(10), '; ')}" for r in report.failed],
            fix=f"fix the entries above and re-run: finished bundles are skipped ({report.report_md})",
        )
