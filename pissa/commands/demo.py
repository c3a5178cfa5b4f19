"""``pissa demo``: run the whole pipeline offline on the embedded SmolLM2-135M-Instruct."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from pissa.commands.common import default_of, table
from pissa.demo import run_demo

if TYPE_CHECKING:
    from pissa.demo import DemoReport, StepResult

MARKS = {"ok": "ok ", "skipped": "skipped", "failed": "FAILED"}


def summary(report: DemoReport) -> str:
    """The table printed at the end: each step's status, time, and why it was skipped or failed."""
    rows = [[s.name, s.status, f"{s.seconds:.1f} s", s.reason] for s in report.steps]
    total = "ok" if report.ok else "failed"
    rows.append(["total", total, f"{sum(s.seconds for s in report.steps):.1f} s", ""])
    headers = ["step", "status", "time", "note"]
    if not any(s.reason for s in report.steps):
        headers, rows = headers[:3], [r[:3] for r in rows]
    return "\n".join(line.rstrip() for line in table(headers, rows).splitlines())


@click.command("demo")
@click.option("--workdir", default=default_of(run_demo, "workdir"), show_default=True,
              type=click.Path(file_okay=False),
              help="Where the bundle, training run and adapters go: a new or empty folder, or a previous demo's "
                   "(whose demo outputs are replaced).")
def demo(workdir: str) -> None:
    """Convert → verify → recipe check → train → export → answer → serve (vLLM), with a summary."""
    def show(step: StepResult) -> None:
        click.echo(f"[{MARKS[step.status]}] {step.name} ({step.seconds:.1f} s): {step.detail}")

    report = run_demo(workdir, on_step=show)
    click.echo()
    click.echo(summary(report))
    failure = report.failure
    if failure is not None and failure.error is not None:
        raise failure.error  # one line with its fix, and its exit code, like every other command's errors
