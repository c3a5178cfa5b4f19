"""``pissa demo``: run the whole pipeline offline on the embedded SmolLM2-135M-Instruct."""

from __future__ import annotations

import click

from pissa.commands.common import default_of, table
from pissa.demo import run_demo


@click.command("demo")
@click.option("--workdir", default=default_of(run_demo, "workdir"), show_default=True,
              type=click.Path(file_okay=False),
              help="Where the bundle, training run and adapters go (replaced).")
def demo(workdir: str) -> None:
    """Convert → verify → recipe check → train → export → answer → serve (vLLM), with a summary."""
    def show(step) -> None:
        mark = "ok " if step.ok else "FAILED"
        click.echo(f"[{mark}] {step.name} ({step.seconds:.1f} s): {step.detail}")

    report = run_demo(workdir, on_step=show)
    click.echo()
    rows = [[s.name, "ok" if s.ok else "failed", f"{s.seconds:.1f} s"] for s in report.steps]
    rows.append(["total", "ok" if report.ok else "failed", f"{sum(s.seconds for s in report.steps):.1f} s"])
    click.echo(table(["step", "status", "time"], rows))
    if not report.ok:
        raise SystemExit(1)
