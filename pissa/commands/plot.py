"""``pissa plot RUN [RUN ...]``: thin CLI over :func:`training.plot.plot_runs`."""

from __future__ import annotations

import click


@click.command(name="plot")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--out", default=None, type=click.Path(path_type=str),
              help="PNG to write (default: loss.png in the first run, or loss-compare.png for several runs).")
@click.option("--title", default=None, help="Figure title.")
def plot(runs: tuple[str, ...], out: str | None, title: str | None) -> None:
    """Plot the training/eval loss curves of one or more runs (e.g. PiSSA vs its LoRA baseline)."""
    from pathlib import Path

    from training.plot import plot_runs

    target = out or str(Path(runs[0]) / ("loss.png" if len(runs) == 1 else "loss-compare.png"))
    click.echo(f"wrote {plot_runs(list(runs), target, title=title)}")
