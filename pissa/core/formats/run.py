"""A training run of ``pissa train`` and the record next to every adapter it writes.

```
RUN/
  run.json                      options, data statistics, bundle, status and results
  metrics.jsonl                 one JSON object per logged step
  loss.png                      the loss curve
  checkpoints/checkpoint-N/     Trainer checkpoints (PEFT adapter + optimizer state)
  adapter/                      the final PEFT adapter
```

Every adapter (final and checkpoints) also holds ``pissa_training.json``: the bundle it was trained
from, the init (``pissa`` or ``lora``) and the sha256 of the ``pissa_init`` weights it started
from, which ``pissa export`` checks against the bundle's own records.
"""

from __future__ import annotations

from pathlib import Path

from pissa.core.formats import adapter
from pissa.core.formats.bundle import Bundle
from pissa.core.hashing import sha256_file
from pissa.core.jsonio import write_json

RECORD = "run.json"
METRICS = "metrics.jsonl"
PLOT = "loss.png"
ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_RECORD = "pissa_training.json"
TRAINING_FORMAT = "pissa-training"


def is_run(path: Path) -> bool:
    return (path / RECORD).is_file()


def write_training_record(adapter_dir: Path, *, bundle: Bundle, init: str, step: int | None = None) -> None:
    """Write ``pissa_training.json`` next to an adapter trained from ``bundle``.

    Args:
        adapter_dir: the adapter folder (final adapter or a checkpoint).
        bundle: the bundle it was trained from.
        init: ``pissa`` (trained from the bundle's pissa_init) or ``lora`` (plain-LoRA baseline).
        step: optimizer step of this adapter.
    """
    write_json(
        adapter_dir / TRAINING_RECORD,
        {
            "format": TRAINING_FORMAT,
            "bundle": str(bundle.path),
            "init": init,
            "pissa_init_sha256": sha256_file(bundle.init_dir / adapter.WEIGHTS) if init == "pissa" else None,
            "base_model": bundle.base_model,
            "step": step,
        },
    )
