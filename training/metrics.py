"""``metrics.jsonl`` of a run: one JSON object per logged step, written as training goes.

Training lines: ``{"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "time_s"}``; eval
lines: ``{"step", "epoch", "eval_loss"}``. On ``--resume`` lines after the checkpoint's step are
dropped before the run continues, so the file always describes one trajectory.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pissa.core.errors import CorruptCheckpointError
from pissa.core.formats.run import METRICS as METRICS_FILE
from pissa.core.jsonio import is_number

logger = logging.getLogger(__name__)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All metric lines of a run folder (or of a metrics.jsonl path). A last line that is not JSON (a run
    stopped while appending it) is left out with a warning.

    Raises:
        CorruptCheckpointError: another line is not a JSON object (one line, with its number).
    """
    path = path / METRICS_FILE if path.is_dir() else path
    if not path.exists():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"{path} is not readable: {exc}", path=str(path),
                                     fix="restore it from the run's checkpoints or train again") from None
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    out: list[dict[str, Any]] = []
    for i, (n, line) in enumerate(numbered):
        try:
            value = json.loads(line)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            if i == len(numbered) - 1:
                logger.warning("%s: line %d is cut off or not JSON; left out", path, n)
                continue
            raise CorruptCheckpointError(f"{path}: line {n} is not a JSON object", path=str(path),
                                         fix="delete or repair that line")
        out.append(value)
    return out


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the lines with ``step <= step`` (used when resuming from a checkpoint)."""
    lines = [m for m in read_metrics(path) if m.get("step", 0) <= step]
    (path / METRICS_FILE).write_text("".join(json.dumps(m) + "\n" for m in lines), encoding="utf-8")


def append_metrics(path: Path, line: dict[str, Any]) -> None:
    with (path / METRICS_FILE).open("a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


@dataclass(frozen=True)
class Curves:
    """Loss curves of one run, ready to plot or compare."""

    steps: tuple[int, ...]
    loss: tuple[float, ...]
    eval_steps: tuple[int, ...]
    eval_loss: tuple[float, ...]
    tokens_per_s: tuple[float, ...]


def curves(path: Path) -> Curves:
    """The run's curves.

    Raises:
        CorruptCheckpointError: a line's step or loss is not a number (one line, naming the first such line).
    """
    lines = read_metrics(path)
    for n, m in enumerate(lines, 1):
        bad = [k for k in ("step", "loss", "eval_loss", "tokens_per_s") if m.get(k) is not None and not is_number(m[k])]
        if bad or (("loss" in m or "eval_loss" in m) and not is_number(m.get("step"))):
            raise CorruptCheckpointError(f"{path}: metrics line {n} has a {(bad or ['step'])[0]} that is not a number",
                                         path=str(path), fix="delete or repair that line")
    train = [m for m in lines if "loss" in m]
    ev = [m for m in lines if "eval_loss" in m]
    return Curves(
        steps=tuple(int(m["step"]) for m in train),
        loss=tuple(float(m["loss"]) for m in train),
        eval_steps=tuple(int(m["step"]) for m in ev),
        eval_loss=tuple(float(m["eval_loss"]) for m in ev),
        tokens_per_s=tuple(float(m["tokens_per_s"]) for m in train if m.get("tokens_per_s") is not None),
    )
