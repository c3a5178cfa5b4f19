"""Helpers shared by the serving tests and ``bench/serve.py``: tenant adapters made with PEFT.

A "tenant" here is a standard PEFT LoRA adapter for a base folder, with random non-zero weights
(``init_lora_weights=False``) from a per-tenant seed, so each tenant's greedy output differs from
the base and from the other tenants. Serving tests use these rather than convert → train → export,
which would cost seconds per tenant and add nothing to what they check; adapters written by
``pissa export`` are served in ``tests/test_export_vllm.py`` and by ``pissa demo``.
"""

from __future__ import annotations

from pathlib import Path

from pissa.core.formats import adapter as adapter_format

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_peft_adapter(
    base: str | Path,
    out: str | Path,
    *,
    seed: int,
    rank: int = 8,
    alpha: int | None = None,
    targets: tuple[str, ...] = LLAMA_TARGETS,
    std: float = 0.1,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write a non-zero PEFT LoRA adapter for ``base`` into ``out``.

    Args:
        base: base model folder.
        out: adapter folder (created).
        seed: weight seed (distinct per tenant).
        rank: LoRA rank.
        alpha: lora_alpha (default: rank).
        targets: target module names.
        std: standard deviation of the random lora_A / lora_B entries.
        base_model_name_or_path: recorded base (default: ``str(base)``).

    Returns:
        ``out``.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = LoraConfig(
        r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=list(targets),
        init_lora_weights=False, lora_dropout=0.0,
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, std)
    peft_model.peft_config["default"].base_model_name_or_path = (
        str(base) if base_model_name_or_path is None else base_model_name_or_path
    )
    out = Path(out)
    # save_embedding_layers=False: an lm_head target would otherwise also save the base lm_head weight.
    peft_model.save_pretrained(str(out), save_embedding_layers=False)
    # save_pretrained records the flag it was built with; a served adapter states a standard init.
    import json

    cfg_path = out / adapter_format.CONFIG
    cfg = json.loads(cfg_path.read_text())
    cfg["init_lora_weights"] = True
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out
