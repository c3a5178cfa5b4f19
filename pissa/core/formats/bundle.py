"""The PiSSA bundle: the layout ``pissa convert`` writes and every later stage reads.

```
BUNDLE/
  config.json, tokenizer files, ...        copied from the source
  model*.safetensors (+ index)              residual model: same keys, dtypes, shard split (QPiSSA
                                            packed: each target weight in bitsandbytes' 4-bit layout,
                                            formats/nf4.py, and quantization_config in config.json)
  pissa_init/adapter_config.json            PEFT LoRA config, init_lora_weights=true
  pissa_init/adapter_model.safetensors      lora_A [r, in], lora_B [out, r]
  pissa.json                                provenance, options, per-matrix statistics, checksums
  README.md                                 model card
```
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pissa.core.errors import CorruptCheckpointError, SourceNotFoundError
from pissa.core.formats import adapter, model
from pissa.core.jsonio import read_json

INIT_DIR = "pissa_init"
RECORD = "pissa.json"
CARD = model.CARD
PARTS = ".parts"  # per-shard results of an unfinished conversion, in its staging folder
FORMAT = "pissa-bundle"
FORMAT_VERSION = 1
#: pissa.json's ``files`` key of the initial adapter's weights.
INIT_WEIGHTS_KEY = f"{INIT_DIR}/{adapter.WEIGHTS}"
#: pissa.json's list of matrices left out of the conversion, each ``{kind, count, tensors, patterns,
#: reason}`` (MoE experts and routers); absent or empty when every linear layer but the output one
#: was a candidate.
LEFT_OUT_KEY = "left_out"
QUANT_KEY = "quantization"  # QPiSSA bundles: how the residual is quantized and stored
STORAGE_PACKED = "nf4-packed"  # residual targets in bitsandbytes' 4-bit layout (formats/nf4.py)
STORAGE_DEQUANTIZED = "dequantized"  # residual targets as deq(Q) in a float dtype


def is_bundle(path: Path) -> bool:
    return (path / RECORD).is_file() and (path / INIT_DIR / adapter.CONFIG).is_file()


def read_record(bundle: str | os.PathLike[str]) -> dict[str, Any]:
    """Parsed ``pissa.json`` of a bundle (typed errors from :func:`pissa.core.jsonio.read_json`)."""
    return read_json(Path(bundle) / RECORD)


@dataclass(frozen=True)
class Bundle:
    """A PiSSA bundle on disk and its record (``pissa.json``)."""

    path: Path
    manifest: dict[str, Any]

    @property
    def init_dir(self) -> Path:
        return self.path / INIT_DIR

    @property
    def base_model(self) -> str | None:
        base = self.manifest.get("base_model")
        return str(base) if base else None

    @property
    def recorded_init_sha256(self) -> str | None:
        return (self.manifest.get("files") or {}).get(INIT_WEIGHTS_KEY)

    @property
    def quantization(self) -> dict[str, Any] | None:
        """pissa.json's ``quantization`` entry (QPiSSA bundles), else None."""
        q = self.manifest.get(QUANT_KEY)
        return q if isinstance(q, dict) else None

    @property
    def packed(self) -> bool:
        """Whether the residual's targets are stored packed in 4 bits (transformers needs bitsandbytes)."""
        return (self.quantization or {}).get("storage") == STORAGE_PACKED

    def matrices(self) -> dict[str, dict[str, Any]]:
        """Per-module records of pissa.json keyed by module name."""
        return {m["name"]: m for m in self.manifest.get("matrices") or [] if isinstance(m, dict) and "name" in m}


def open_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Open a bundle folder, or raise a one-line error saying what is missing."""
    p = Path(path)
    if not p.exists():
        raise SourceNotFoundError(f"bundle {p} does not exist", path=str(p), fix="create it with `pissa convert`")
    if not is_bundle(p):
        raise SourceNotFoundError(
            f"{p} is not a PiSSA bundle (no {RECORD} and {INIT_DIR}/)",
            path=str(p),
            fix="pass a folder written by `pissa convert`",
        )
    manifest = read_record(p)
    if manifest.get("format") != FORMAT:
        raise CorruptCheckpointError(
            f"{p / RECORD}: format is {manifest.get('format')!r}, expected {FORMAT!r}", path=str(p)
        )
    return Bundle(path=p.resolve(), manifest=manifest)
