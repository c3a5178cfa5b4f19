"""4-bit bases for QPiSSA and QLoRA training (bitsandbytes, imported lazily).

- QPiSSA: a packed QPiSSA bundle (``quantization.storage == nf4-packed`` in pissa.json) loads as a 4-bit
  model by itself (``quantization_config`` in its config.json); the frozen ``Linear4bit`` layers then
  compute in the run's dtype (float32 on CPU by default), not in the bundle's compute dtype.
- QLoRA: ``NF4(W)`` of the ORIGINAL weights, quantized here in memory from float32 (NF4, blocksize 64,
  no double quantization: the converter's defaults, so QPiSSA and QLoRA share the quantizer), for the
  same target modules the adapter covers; every other layer stays as it is.
"""

from __future__ import annotations

from typing import Any

from pissa.core.errors import MissingDependencyError

QLORA_BLOCKSIZE = 64
QLORA_QUANT_TYPE = "nf4"


def require_bitsandbytes() -> Any:
    """The ``bitsandbytes`` module, or :class:`MissingDependencyError`."""
    try:
        import bitsandbytes
    except ImportError as exc:
        raise MissingDependencyError("bitsandbytes", extra="quant", purpose="to train on a 4-bit base") from exc
    return bitsandbytes


def set_compute_dtype(model: Any, dtype: Any) -> int:
    """Make every ``Linear4bit`` of ``model`` compute in ``dtype``; returns how many there are."""
    bnb = require_bitsandbytes()
    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype = dtype
            module.compute_type_is_set = True
            n += 1
    return n


def quantize_targets(model: Any, target_modules: list[str] | str, compute_dtype: Any) -> int:
    """Replace each ``nn.Linear`` that ``target_modules`` names (PEFT's matching rules) by a frozen
    ``Linear4bit`` holding ``NF4(W)`` quantized from float32. Returns the number of layers replaced.

    Raises:
        MissingDependencyError: bitsandbytes is not installed.
    """
    import torch
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    bnb = require_bitsandbytes()
    config = LoraConfig(target_modules=target_modules)
    chosen = [
        (name, module) for name, module in model.named_modules()
        if type(module) is torch.nn.Linear and check_target_module_exists(config, name)
    ]
    for name, linear in chosen:
        new = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=compute_dtype,
            compress_statistics=False, quant_type=QLORA_QUANT_TYPE, device="meta",
        )
        weight = bnb.nn.Params4bit(
            linear.weight.data.to(torch.float32), requires_grad=False, blocksize=QLORA_BLOCKSIZE,
            compress_statistics=False, quant_type=QLORA_QUANT_TYPE, module=new,
        )
        new.weight = weight._quantize(linear.weight.device)
        if linear.bias is not None:
            new.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return len(chosen)
