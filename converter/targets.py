"""Which tensors of a checkpoint are target linear layers, and how they map to module names.

PEFT's "all-linear" means every ``nn.Linear`` / ``Conv1D`` except the output layer. The exact answer
needs the model's module types, i.e. transformers, whose import costs 3–5 s. For the families in
:data:`FAMILIES` a table states the answer (layer names, Conv1D orientation, module prefix); a
test builds every listed family on the meta device and checks the table against the real modules,
so the table cannot drift. Any other architecture is introspected on the meta device.

Mixture-of-Experts checkpoints: the experts' matrices and the routers are left out of the default
(see :func:`convertible_layers`). transformers 5 loads experts fused into 3-D parameters
(``mlp.experts.gate_up_proj [E, 2I, H]``) whatever the layout on disk (often per-expert
``block_sparse_moe.experts.N.w1.weight``), so a LoRA module per expert would not attach; PEFT adapts
them only through ``target_parameters``, which this converter does not write yet. Routers
(``block_sparse_moe.gate`` / ``mlp.gate`` / ``mlp.router``, ``[E, hidden]``) are left out by design:
a router has only E rows (8 for Mixtral), so with E ≤ r PiSSA would move all of it into the adapter
and leave a zero residual; left out, tokens are routed exactly as in the source. (PEFT 0.21's all-linear
adapts both, as parameters.) Both are recorded (:class:`LeftOut`), and ``--targets`` naming them is
refused.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

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


def select_targets(
    all_linear: list[Target], names: tuple[str, ...] | None, left_out: list[LeftOut] | tuple[LeftOut, ...] = ()
) -> list[Target]:
    """The targets named by ``--targets`` (default: all).

    A name matches a module when it equals the module's last component (``q_proj``), or the module
    path ends with it (``self_attn.q_proj``, or the full path).

    Raises:
        TargetError: a name matches nothing, or names a left-out layer (an MoE expert or router);
            the error lists the names that can be chosen.
    """
    if names is None:
        if not all_linear:
            raise TargetError("no linear layers found", ["the checkpoint has no linear layers to convert"])
        return list(all_linear)
    wanted = [n.strip() for n in names if n.strip()]
    chosen: dict[str, Target] = {}
    problems = []
    for name in wanted:
        hits = [t for t in all_linear if t.module == name or t.module.endswith("." + name)]
        refused = [(lo, k) for lo in left_out for k in lo.keys if _names_left_out(name, k, bool(hits))]
        if refused:
            lo, key = refused[0]
            problems.append(
                f"--targets {name!r} names {_LABELS[lo.kind]} (e.g. {_pattern(key)}): {lo.reason}"
            )
        elif not hits:
            problems.append(f"--targets {name!r} matches no linear layer")
        for t in hits:
            chosen[t.key] = t
    if problems:
        available = sorted({t.short_name for t in all_linear})
        raise TargetError(
            "unknown target names" if not left_out else "unknown or unsupported target names",
            problems,
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


# --- Mixture-of-Experts: what the default leaves out, and why ----------------------------------------
EXPERTS = "moe_experts"
ROUTER = "moe_router"
REASONS = {
    EXPERTS: "MoE experts are not supported yet",
    ROUTER: "MoE routers are left out by design: tokens are routed exactly as in the source",
}
_LABELS = {EXPERTS: "expert matrices", ROUTER: "router matrices"}
# config keys that hold the number of routed experts, by family (mixtral, qwen2_moe, deepseek, ernie)
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class LeftOut:
    """Matrices of one kind (:data:`EXPERTS`, :data:`ROUTER`) that no adapter is made for.

    They are copied unchanged into the residual model. ``count`` is in matrices: a fused
    ``[E, out, in]`` tensor holds ``E``.
    """

    kind: str
    keys: tuple[str, ...]  # checkpoint tensor keys
    count: int

    @property
    def reason(self) -> str:
        return REASONS[self.kind]

    def patterns(self) -> list[str]:
        """The keys with their numeric path components (layer, expert index) as ``*``."""
        return sorted({_pattern(k) for k in self.keys})

    def to_record(self) -> dict[str, Any]:
        """The entry of pissa.json's ``left_out`` list."""
        return {
            "kind": self.kind,
            "count": self.count,
            "tensors": len(self.keys),
            "patterns": self.patterns(),
            "reason": self.reason,
        }


def _pattern(key: str) -> str:
    return ".".join("*" if part.isdigit() else part for part in key.split("."))


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """A recorded ``left_out`` pattern as a regex over tensor keys (``*`` is one numeric component)."""
    return re.compile(r"\.".join(r"\d+" if p == "*" else re.escape(p) for p in pattern.split(".")) + "$")


def matrix_count(shape: tuple[int, ...]) -> int:
    """Matrices in a weight tensor: 1 for ``[out, in]``, ``E`` for a fused ``[E, out, in]``."""
    return shape[0] if len(shape) == 3 else 1


def expert_count(config: dict[str, Any]) -> int | None:
    """Routed experts per MoE layer from a config.json, or None for a dense model."""
    for key in _EXPERT_COUNT_KEYS:
        value = config.get(key)
        if isinstance(value, int) and value > 1:
            return value
    return None


def _moe_kind(key: str, shape: tuple[int, ...], n_experts: int | None) -> str | None:
    """:data:`EXPERTS`, :data:`ROUTER` or None for one checkpoint tensor.

    Experts: a matrix under an ``experts`` module (per-expert ``experts.N.w1.weight`` or fused
    ``experts.gate_up_proj [E, out, in]``), or any ``[E, out, in]`` tensor of an MoE model (older
    GraniteMoE ``input_linear``). Routers: an ``[E, hidden]`` weight under a ``gate`` / ``router``
    module. Biases are not matrices.
    """
    parts = key.split(".")
    if parts[-1] == "bias" or parts[-1].endswith("_bias"):
        return None
    is_matrix = (len(shape) == 2 and parts[-1] == "weight") or len(shape) == 3
    if not is_matrix:
        return None
    if "experts" in parts[:-1] or (len(shape) == 3 and n_experts is not None and shape[0] == n_experts):
        return EXPERTS
    if (
        len(shape) == 2
        and n_experts is not None
        and shape[0] == n_experts
        and any(p in ("gate", "router") for p in parts[:-1])
    ):
        return ROUTER
    return None


def convertible_layers(ckpt: Checkpoint) -> tuple[list[Target], list[LeftOut]]:
    """The all-linear targets this converter can make adapters for, and the matrices it leaves out.

    Everything :func:`linear_layers` finds, minus MoE experts and routers (some families make the
    router an ``nn.Linear``: phimoe, llama4), which are returned as :class:`LeftOut` groups
    (empty for a dense model).
    """
    all_linear = linear_layers(ckpt)
    n_experts = expert_count(ckpt.config)
    kinds: dict[str, list[str]] = {EXPERTS: [], ROUTER: []}
    counts = dict.fromkeys(kinds, 0)
    for key, info in ckpt.tensors.items():
        kind = _moe_kind(key, tuple(info.shape), n_experts)
        if kind is not None:
            kinds[kind].append(key)
            counts[kind] += matrix_count(tuple(info.shape))
    left_out = [LeftOut(kind, tuple(keys), counts[kind]) for kind, keys in kinds.items() if keys]
    skipped = {k for lo in left_out for k in lo.keys}
    if skipped:
        log.info("left out: %s", describe_left_out([lo.to_record() for lo in left_out]))
    return [t for t in all_linear if t.key not in skipped], left_out


def describe_left_out(entries: list[dict[str, Any]]) -> str:
    """One line from pissa.json's ``left_out`` list: ``24 expert matrices (MoE experts are not supported yet)``."""
    return "; ".join(f"{e.get('count')} {_LABELS.get(str(e.get('kind')), 'matrices')} ({e.get('reason')})" for e in entries)


def _names_left_out(name: str, key: str, named_a_target: bool) -> bool:
    """Whether ``--targets name`` names the left-out tensor ``key``.

    As for targets, a name matches the module path's end (``w1``, ``experts.0.w1``, ``gate``,
    ``gate_up_proj``); a name that matches no target also counts when it is any run of the path's
    components (``experts``, ``block_sparse_moe``).
    """
    stem = key[: -len(".weight")] if key.endswith(".weight") else key
    if stem == name or stem.endswith("." + name):
        return True
    return not named_a_target and f".{name}." in f".{stem}."
