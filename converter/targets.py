"""Which tensors of a checkpoint are target linear layers, and how they map to module names.

PEFT's "all-linear" means every ``nn.Linear`` / ``Conv1D`` except the output layer. The exact answer
needs the model's module types, i.e. transformers, whose import costs 3–5 s. For the families in
:data:`FAMILIES` a table states the answer (layer names, Conv1D orientation, module prefix); a
test builds every listed family on the meta device and checks the table against the real modules,
so the table cannot drift. Any other architecture is introspected on the meta device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from converter.checkpoint import Checkpoint
from pissa.core.errors import TargetError, UnsupportedCheckpointError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """Facts about one ``model_type`` that target discovery needs."""

    linear: tuple[str, ...]  # last module-name component of every linear layer but the output one
    prefix: str  # base_model_prefix: module paths start with it
    conv1d: bool = False  # weights stored as Wᵀ (transformers' Conv1D)


_LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FAMILIES: dict[str, Family] = {
    "llama": Family(_LLAMA_LIKE, "model"),
    "mistral": Family(_LLAMA_LIKE, "model"),
    "qwen2": Family(_LLAMA_LIKE, "model"),
    "qwen3": Family(_LLAMA_LIKE, "model"),
    "gemma": Family(_LLAMA_LIKE, "model"),
    "gemma2": Family(_LLAMA_LIKE, "model"),
    "phi3": Family(("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), "model"),
    "gpt2": Family(("c_attn", "c_proj", "c_fc"), "transformer", conv1d=True),
}


@dataclass(frozen=True)
class Target:
    """One matrix to factor."""

    key: str  # tensor key in the checkpoint
    module: str  # module path in the transformers model (PEFT adapter keys use it)
    file: str  # weight file holding it
    shape: tuple[int, int]  # stored shape
    fan_in_fan_out: bool  # stored as Wᵀ

    @property
    def out_in(self) -> tuple[int, int]:
        """Logical ``(out_features, in_features)``."""
        return (self.shape[1], self.shape[0]) if self.fan_in_fan_out else self.shape

    @property
    def short_name(self) -> str:
        return self.module.rsplit(".", 1)[-1]


def _introspect(config: dict) -> tuple[dict[str, bool], str]:
    """``{module_path: fan_in_fan_out}`` of all-linear layers, from a meta-device model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "quantization_config"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    output = model.get_output_embeddings()
    found = {}
    for name, module in model.named_modules():
        if module is output:
            continue
        if isinstance(module, Conv1D):
            found[name] = True
        elif isinstance(module, torch.nn.Linear):
            found[name] = False
    return found, model.base_model_prefix


def linear_layers(ckpt: Checkpoint) -> list[Target]:
    """Every all-linear target of the checkpoint, in checkpoint key order."""
    model_type = str(ckpt.config.get("model_type", ""))
    family = FAMILIES.get(model_type)
    weights = {k: t for k, t in ckpt.tensors.items() if k.endswith(".weight") and len(t.shape) == 2}
    if family is not None:
        modules = {
            k[: -len(".weight")]: family.conv1d
            for k in weights
            if k[: -len(".weight")].rsplit(".", 1)[-1] in family.linear
        }
        prefix = family.prefix
    else:
        log.info("model_type %r is not in the table: introspecting its modules", model_type)
        try:
            modules, prefix = _introspect(ckpt.config)
        except Exception as exc:  # noqa: BLE001 - transformers raises many types for unknown configs
            raise UnsupportedCheckpointError(
                f"cannot build model_type {model_type!r} to find its linear layers ({exc})",
                fix="upgrade transformers, or name the layers with --targets",
            ) from exc
    has_prefix = any(k.startswith(prefix + ".") for k in ckpt.tensors)
    targets = []
    for key, info in weights.items():
        stem = key[: -len(".weight")]
        module = stem if has_prefix or not prefix else f"{prefix}.{stem}"
        if stem in modules:
            fan = modules[stem]
        elif module in modules:
            fan = modules[module]
        else:
            continue
        targets.append(Target(key, module, info.file, (info.shape[0], info.shape[1]), fan))
    return targets


def select_targets(all_linear: list[Target], names: tuple[str, ...] | None) -> list[Target]:
    """The targets named by ``--targets`` (default: all).

    A name matches a module when it equals the module's last component (``q_proj``), or the module
    path ends with it (``self_attn.q_proj``, or the full path).

    Raises:
        TargetError: a name matches nothing (the error lists the names that exist).
    """
    if names is None:
        if not all_linear:
            raise TargetError("no linear layers found", ["the checkpoint has no linear layers to convert"])
        return list(all_linear)
    wanted = [n.strip() for n in names if n.strip()]
    chosen: dict[str, Target] = {}
    unknown = []
    for name in wanted:
        hits = [t for t in all_linear if t.module == name or t.module.endswith("." + name)]
        if not hits:
            unknown.append(name)
        for t in hits:
            chosen[t.key] = t
    if unknown:
        available = sorted({t.short_name for t in all_linear})
        raise TargetError(
            "unknown target names",
            [f"--targets {n!r} matches no linear layer" for n in unknown],
            fix=f"choose from: {', '.join(available)} (or full module paths)",
        )
    return [t for t in all_linear if t.key in chosen]


def peft_target_modules(selected: list[Target], all_linear: list[Target]) -> list[str]:
    """``target_modules`` for the adapter config: short names when they select exactly these layers."""
    short = sorted({t.short_name for t in selected})
    by_short = {t.key for t in all_linear if t.short_name in short}
    if by_short == {t.key for t in selected}:
        return short
    return sorted(t.module for t in selected)
