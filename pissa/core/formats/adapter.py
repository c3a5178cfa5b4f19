"""A PEFT LoRA adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are PEFT's saved names: ``base_model.model.<module>.lora_A.weight`` ([r, in]),
``...lora_B.weight`` ([out, r]); embedding adapters use ``lora_embedding_A`` / ``lora_embedding_B``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pissa.core.errors import CorruptCheckpointError, SourceNotFoundError
from pissa.core.jsonio import read_json

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
#: Every weight file name PEFT has written (only safetensors is read here).
WEIGHT_FILES = (WEIGHTS, "adapter_model.bin", "adapter_model.pt")
KEY_PREFIX = "base_model.model."
#: key suffix -> part name, as PEFT names the parameters.
_PARTS = {
    ".lora_A.weight": "lora_A",
    ".lora_B.weight": "lora_B",
    ".lora_embedding_A": "lora_embedding_A",
    ".lora_embedding_B": "lora_embedding_B",
}


def adapter_key(module: str, part: str) -> str:
    """PEFT's saved key of ``lora_A`` / ``lora_B`` for ``module``."""
    return f"{KEY_PREFIX}{module}.{part}.weight"


def split_adapter_key(key: str) -> tuple[str, str] | None:
    """``base_model.model.<module>.lora_A.weight`` -> ``(<module>, "lora_A")``; None: not a LoRA tensor."""
    for suffix, part in _PARTS.items():
        if key.endswith(suffix):
            return key[: -len(suffix)].removeprefix(KEY_PREFIX), part
    return None


def is_adapter_dir(path: Path) -> bool:
    return (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def lora_config(
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


def lora_scaling(config: dict[str, Any]) -> float:
    """PEFT's scaling of an adapter config: ``lora_alpha / r`` (``/ √r`` with rsLoRA)."""
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    return alpha / r**0.5 if config.get("use_rslora") else alpha / r


def load_adapter(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(adapter_config, state_dict)`` of a PEFT adapter folder (safetensors only)."""
    from safetensors.torch import load_file

    if not is_adapter_dir(path):
        raise SourceNotFoundError(f"{path} is not a PEFT adapter folder (needs {CONFIG} and {WEIGHTS})", path=str(path))
    config = read_json(path / CONFIG)
    try:
        tensors = load_file(str(path / WEIGHTS))
    except Exception as exc:  # safetensors raises its own error types
        raise CorruptCheckpointError(f"{path / WEIGHTS} cannot be read: {exc}", path=str(path)) from exc
    return config, tensors
