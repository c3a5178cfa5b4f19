"""Export on real weights (SmolLM2-135M-Instruct): train a few steps, export, compare with the
original model as transformers loads it from the GGUF (independently of our converter).

Claims: logits of (original base + exported LoRA) equal logits of (fp32 residual + trained PiSSA
adapter) within fp32 atol 1e-4; our exact export equals PEFT's own conversion tensor for tensor;
``--rank auto`` picks a vLLM rank and the truncation error it records is the true one.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol(tmp_path_factory, smollm2_gguf):
    """(bundle, run, original model) with an fp32 residual and 3 real training steps."""
    from transformers import AutoModelForCausalLM

    from converter.convert import convert
    from converter.options import ConvertOptions
    from training.tasks import ARITH_TRAIN
    from training.train import train

    root = tmp_path_factory.mktemp("smol")
    bundle = root / "bundle"
    convert(smollm2_gguf, bundle, ConvertOptions(rank=16, dtype="float32"), progress=False)
    run = root / "run"
    train(bundle, ARITH_TRAIN, run, max_steps=3, lr=1e-3, batch_size=4, max_length=64, progress=False)
    original = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                    dtype=torch.float32).eval()
    return bundle, run, original


def _ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 49152, (2, 24), generator=g)


def test_smollm2_export_matches_on_original(tmp_path, smol):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from converter.export import export

    bundle, run, original = smol
    export(run, tmp_path / "exact")
    residual = AutoModelForCausalLM.from_pretrained(bundle, dtype=torch.float32)
    pissa = PeftModel.from_pretrained(residual, run / "adapter").eval()
    with torch.no_grad():
        ref = pissa(input_ids=_ids()).logits
        before = original(input_ids=_ids()).logits
    lora = PeftModel.from_pretrained(original, tmp_path / "exact").eval()
    with torch.no_grad():
        got = lora(input_ids=_ids()).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    assert (before - ref).abs().max() > 1e-2  # training moved the model
    lora.unload()

    # PEFT's own conversion, tensor for tensor.
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bundle, dtype=torch.float32),
                                        run / "adapter", is_trainable=True)
    init_copy = tmp_path / "init" / "pissa_init"
    shutil.copytree(bundle / "pissa_init", init_copy)
    trained.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(init_copy))
    ours, theirs = load_file(str(tmp_path / "exact/adapter_model.safetensors")), load_file(
        str(tmp_path / "peft/adapter_model.safetensors"))
    assert ours.keys() == theirs.keys() and len(ours) == 2 * 210
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_smollm2_rank_auto(tmp_path, smol):
    from converter.export import export
    from converter.export_math import VLLM_LORA_RANKS

    bundle, run, _ = smol
    report = export(run, tmp_path / "auto", rank="auto", tol=0.05)
    assert report.rank in VLLM_LORA_RANKS and report.max_rel_error <= 0.05
    record = json.loads((tmp_path / "auto/pissa_export.json").read_text())
    assert record["max_lora_rank"] == report.rank
    # The recorded error of one layer, recomputed densely.
    t = load_file(str(run / "adapter/adapter_model.safetensors"))
    i = load_file(str(bundle / "pissa_init/adapter_model.safetensors"))
    w = load_file(str(tmp_path / "auto/adapter_model.safetensors"))
    layer = max(record["layers"], key=lambda e: e["rel_error"])
    key = f"base_model.model.{layer['name']}"
    a, b = f"{key}.lora_A.weight", f"{key}.lora_B.weight"
    dense = t[b].double() @ t[a].double() - i[b].double() @ i[a].double()
    approx = w[b].double() @ w[a].double()
    err = float(torch.linalg.matrix_norm(dense - approx) / torch.linalg.matrix_norm(dense))
    assert err == pytest.approx(layer["rel_error"], rel=1e-3)
