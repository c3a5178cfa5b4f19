"""The family table in converter/targets.py agrees with the real modules of every listed family.

For each ``model_type`` in :data:`FAMILIES`, a small model is built on the meta device; the table
lookup over its state-dict keys must select exactly PEFT's all-linear set (every nn.Linear / Conv1D
except the output layer) with the right Conv1D orientation, both with and without the base prefix
in the keys.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from converter.checkpoint import Checkpoint, TensorInfo
from converter.targets import FAMILIES, _introspect, linear_layers, peft_target_modules, select_targets
from pissa.core.errors import TargetError

SMALL = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
    vocab_size=128, pad_token_id=0, n_embd=64, n_layer=2, n_head=2, head_dim=32,
)


def _config(model_type: str) -> dict:
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type, **SMALL)
    return cfg.to_dict()


def _fake_checkpoint(config: dict, strip_prefix: bool = False) -> tuple[Checkpoint, dict[str, bool]]:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    prefix = model.base_model_prefix + "."
    tensors = {}
    for key, t in model.state_dict().items():
        stored = key[len(prefix):] if strip_prefix and key.startswith(prefix) else key
        tensors[stored] = TensorInfo(stored, "model.safetensors", "F32", tuple(t.shape))
    ckpt = Checkpoint(Path("."), config, "safetensors", ("model.safetensors",), tensors, {}, (), {})
    truth, _ = _introspect(config)
    return ckpt, truth


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_table_matches_real_modules(model_type):
    ckpt, truth = _fake_checkpoint(_config(model_type))
    found = {t.module: t.fan_in_fan_out for t in linear_layers(ckpt)}
    assert found == truth


def test_keys_without_base_prefix_map_to_module_paths():
    """Original GPT-2 checkpoints store ``h.0.attn.c_attn.weight``; PEFT keys need ``transformer.h.0...``."""
    ckpt, truth = _fake_checkpoint(_config("gpt2"), strip_prefix=True)
    targets = linear_layers(ckpt)
    assert {t.module: t.fan_in_fan_out for t in targets} == truth
    assert all(not t.key.startswith("transformer.") for t in targets)


def test_unknown_family_is_introspected():
    config = _config("granite")  # not in the table
    assert "granite" not in FAMILIES
    ckpt, truth = _fake_checkpoint(config)
    assert {t.module for t in linear_layers(ckpt)} == set(truth)


def test_select_targets_and_peft_names():
    ckpt, _ = _fake_checkpoint(_config("llama"))
    all_linear = linear_layers(ckpt)
    chosen = select_targets(all_linear, ("q_proj", "v_proj"))
    assert {t.short_name for t in chosen} == {"q_proj", "v_proj"} and len(chosen) == 4
    assert peft_target_modules(chosen, all_linear) == ["q_proj", "v_proj"]
    one_layer = select_targets(all_linear, ("layers.0.self_attn.q_proj",))
    assert len(one_layer) == 1
    assert peft_target_modules(one_layer, all_linear) == ["model.layers.0.self_attn.q_proj"]
    with pytest.raises(TargetError) as err:
        select_targets(all_linear, ("q_proj", "lm_head", "nope"))
    assert len(err.value.problems()) == 2 and "q_proj" in (err.value.fix or "")
