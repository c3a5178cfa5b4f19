"""The bundle's fixed layout and its small records (adapter config, pissa.json): no tensors here.

```
BUNDLE/
  config.json, tokenizer files, ...        copied from the source
  model*.safetensors (+ index)              residual model: same keys, dtypes, shard split
  pissa_init/adapter_config.json            PEFT LoRA config, init_lora_weights=true
  pissa_init/adapter_model.safetensors      lora_A [r, in], lora_B [out, r]
  pissa.json                                provenance, options, per-matrix statistics, checksums
  README.md                                 model card
```
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ADAPTER_DIR = "pissa_init"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
RECORD = "pissa.json"
CARD = "README.md"
PARTS = ".parts"  # per-shard results of an unfinished conversion, in its staging folder
FORMAT = "pissa-bundle"
FORMAT_VERSION = 1


def adapter_key(module: str, which: str) -> str:
    """PEFT's saved key of ``lora_A`` / ``lora_B`` for ``module``."""
    return f"base_model.model.{module}.{which}.weight"


def adapter_config(
    *,
    rank: int,
    alpha: float,
    rslora: bool,
    target_modules: list[str],
    fan_in_fan_out: bool,
    base_model_name_or_path: str | None,
) -> dict[str, Any]:
    """A PEFT LoRA ``adapter_config.json`` (``init_lora_weights: true``: the weights are already set).

    Written by hand rather than through ``peft.LoraConfig`` to keep conversion free of the PEFT and
    transformers imports; tests load it with PEFT to keep it honest.
    """
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": target_modules,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": rslora,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file in the same folder, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def read_record(bundle: Path) -> dict[str, Any]:
    """Parsed ``pissa.json`` of a bundle (raises the usual OSError / ValueError)."""
    return json.loads((Path(bundle) / RECORD).read_text())
