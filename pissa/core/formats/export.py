"""An exported LoRA adapter (``pissa export``): a PEFT adapter folder plus ``pissa_export.json``.

The record names the original base, the export mode and rank, per-layer errors, the
``--max-lora-rank`` to serve it with, and the sha256 of the adapter files.
"""

from __future__ import annotations

RECORD = "pissa_export.json"
#: Record names serving accepts next to an adapter (``export.json``: written by early versions).
RECORD_NAMES = (RECORD, "export.json")
