"""Equivalence with the reference implementation: PEFT's own ``init_lora_weights="pissa"``.

For tiny Llama, Qwen2 (biases), Phi-3 (fused qkv/gate_up) and GPT-2 (Conv1D, tied embeddings):
- ``--svd exact`` gives lora_A / lora_B equal to PEFT's up to the sign of each singular vector
  (the k-th row of A and column of B may both flip); atol 1e-4 on values of order 0.1–1;
- the bundle loaded with the authors' recipe (residual model + PeftModel(subfolder="pissa_init"))
  gives the source model's logits (fp32, atol 1e-5);
- PEFT's residual weights equal ours (atol 1e-5).
"""

from __future__ import annotations

import pytest
import torch

from converter.convert import convert
from converter.options import ConvertOptions

RANK = 8


def _peft_reference(source, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    cfg = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=targets, init_lora_weights="pissa",
                     fan_in_fan_out=model.config.model_type == "gpt2")
    return get_peft_model(model, cfg)


def _load_bundle(bundle):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(bundle, dtype=torch.float32)
    return PeftModel.from_pretrained(model, bundle, subfolder="pissa_init", is_trainable=True)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2", "tiny_phi3", "tiny_gpt2"])
def test_exact_matches_peft_pissa(fixture, request, tmp_path):
    from transformers import AutoModelForCausalLM

    source = request.getfixturevalue(fixture)
    bundle = tmp_path / "bundle"
    report = convert(source, bundle, ConvertOptions(rank=RANK, svd="exact"), progress=False)
    assert report.matrices > 0
    assert report.max_rel_error < 1e-6

    ours = _load_bundle(bundle)
    targets = ours.peft_config["default"].target_modules
    ref = _peft_reference(source, list(targets))

    ref_sd = {k: v for k, v in ref.state_dict().items()}
    our_sd = {k: v for k, v in ours.state_dict().items()}
    assert set(ref_sd) == set(our_sd)
    lora_keys = [k for k in ref_sd if ".lora_A." in k]
    assert len(lora_keys) == report.matrices
    for a_key in lora_keys:
        b_key = a_key.replace("lora_A", "lora_B")
        a_ref, b_ref, a, b = ref_sd[a_key], ref_sd[b_key], our_sd[a_key], our_sd[b_key]
        sign = torch.sign((a_ref * a).sum(dim=1))  # per singular vector
        torch.testing.assert_close(a * sign[:, None], a_ref, atol=1e-4, rtol=0)
        torch.testing.assert_close(b * sign[None, :], b_ref, atol=1e-4, rtol=0)
    for key in ref_sd:
        if "lora_" not in key:
            torch.testing.assert_close(our_sd[key], ref_sd[key], atol=1e-5, rtol=0, msg=key)

    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    ids = torch.randint(0, original.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = original(ids).logits
        got = ours.eval()(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_randomized_bundle_reproduces_source(tiny_llama_sharded, tmp_path):
    """The default (randomized) bundle also reproduces the source: W_res is defined as W − s·BA."""
    from transformers import AutoModelForCausalLM

    bundle = tmp_path / "b"
    convert(tiny_llama_sharded, bundle, ConvertOptions(rank=4, alpha=8), progress=False)
    ours = _load_bundle(bundle).eval()
    original = AutoModelForCausalLM.from_pretrained(tiny_llama_sharded, dtype=torch.float32).eval()
    ids = torch.arange(24).reshape(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, original(ids).logits, atol=1e-5, rtol=0)
