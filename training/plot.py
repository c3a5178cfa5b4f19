"""Loss curves of one or more runs as a PNG (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from pissa.core.errors import InvalidOptionsError, OutputWriteError, SourceNotFoundError, TrainingDataError
from pissa.core.formats import run as run_format
from pissa.core.jsonio import read_json
from training.metrics import METRICS_FILE, curves


def run_label(run: Path) -> str:
    """``<folder name> (<init>)`` from the run's run.json when present."""
    record = run / run_format.RECORD
    if record.exists():
        try:
            init = read_json(record).get("options", {}).get("init")
            if init and init not in run.name:
                return f"{run.name} ({init})"
        except (OSError, ValueError):
            pass
    return run.name


def plot_runs(runs: list[str | os.PathLike[str]], out: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """Plot training (solid) and eval (dashed, markers) loss of every run on one figure.

    Args:
        runs: run folders holding ``metrics.jsonl``.
        out: PNG path (written to a temporary name, then renamed).
        title: figure title.

    Returns:
        The PNG path.

    Raises:
        SourceNotFoundError: a run folder or its metrics are missing.
        TrainingDataError: a run has no logged loss yet.
        InvalidOptionsError: ``out`` is not a .png path (or is a folder).
    """
    out_path = Path(out)
    if out_path.suffix.lower() != ".png" or out_path.is_dir():
        raise InvalidOptionsError(f"--out {out} is not a .png file", [],
                                  fix="give a path ending in .png (an existing file there is replaced)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [Path(r) for r in runs]
    absent = [str(p) for p in paths if not p.exists()]
    if absent:
        raise SourceNotFoundError(f"{', '.join(absent)} does not exist", fix="pass run folders of `pissa train`")
    missing = [str(p) for p in paths if not (p / METRICS_FILE).is_file()]
    if missing:
        raise SourceNotFoundError(f"no {METRICS_FILE} in {', '.join(missing)}", fix="pass run folders of `pissa train`")
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for p in paths:
        c = curves(p)
        if not c.steps:
            raise TrainingDataError(f"{p}: no loss logged", [f"{p}/{METRICS_FILE} holds no training loss yet"])
        (line,) = ax.plot(c.steps, c.loss, label=f"{run_label(p)} train", linewidth=1.4)
        if c.eval_steps:
            ax.plot(c.eval_steps, c.eval_loss, "--o", color=line.get_color(), markersize=3,
                    label=f"{run_label(p)} eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (response tokens)")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_path.with_name(f".{out_path.name}.tmp.png")
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp)
        tmp.replace(out_path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise OutputWriteError(f"cannot write {out_path}: {exc.strerror or exc}",
                               fix="give --out a .png path in a writable folder") from None
    finally:
        plt.close(fig)
    return out_path
