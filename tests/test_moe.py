"""Mixture-of-Experts checkpoints: what the converter leaves out is said, recorded and refused.

A tiny Mixtral (4 experts, 2 layers) as transformers 5 saves it holds 24 per-expert matrices
(``block_sparse_moe.experts.N.w1/w2/w3.weight``) and 2 routers (``block_sparse_moe.gate.weight
[4, 128]``); in memory transformers fuses the experts into ``mlp.experts.gate_up_proj [4, 512, 128]``
and ``down_proj [4, 128, 256]``, and a checkpoint may also be stored that way. Neither form gets an
adapter yet: the CLI summary, pissa.json and the model card say so, ``--targets`` naming them is
refused, and ``pissa verify`` checks the record.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from converter.checkpoint import Checkpoint, TensorInfo, open_checkpoint
from converter.convert import convert
from converter.options import ConvertOptions
from converter.targets import EXPERTS, ROUTER, convertible_layers, select_targets
from converter.verify import verify_bundle
from pissa.cli import run
from pissa.core.errors import TargetError, VerificationError

ATTENTION = ["k_proj", "o_proj", "q_proj", "v_proj"]
EXPERT_LINE = "24 expert matrices (MoE experts are not supported yet)"


@pytest.fixture(scope="module")
def tiny_mixtral_fused(tiny_mixtral: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same Mixtral stored the way transformers 5 holds it: fused 3-D expert tensors, mlp.gate."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("mixtral-fused")
    shutil.rmtree(folder)
    shutil.copytree(tiny_mixtral, folder)
    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral, dtype=torch.float32)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits


def test_tiny_mixtral_layout_on_disk(tiny_mixtral):
    """What the fixture really holds (the rest of this file depends on it)."""
    keys = open_checkpoint(tiny_mixtral).tensors
    experts = [k for k in keys if ".block_sparse_moe.experts." in k]
    assert len(experts) == 2 * 4 * 3 and all(keys[k].shape in ((256, 128), (128, 256)) for k in experts)
    assert keys["model.layers.0.block_sparse_moe.gate.weight"].shape == (4, 128)


@pytest.mark.parametrize(("fixture", "expert_tensors", "expert_matrices"),
                         [("tiny_mixtral", 24, 24), ("tiny_mixtral_fused", 4, 16)])
def test_experts_and_routers_are_left_out(fixture, expert_tensors, expert_matrices, request):
    ckpt = open_checkpoint(request.getfixturevalue(fixture))
    targets, left_out = convertible_layers(ckpt)
    assert sorted({t.short_name for t in targets}) == ATTENTION and len(targets) == 8
    by_kind = {lo.kind: lo for lo in left_out}
    assert set(by_kind) == {EXPERTS, ROUTER}
    assert len(by_kind[EXPERTS].keys) == expert_tensors and by_kind[EXPERTS].count == expert_matrices
    assert len(by_kind[ROUTER].keys) == 2 and by_kind[ROUTER].count == 2
    assert not {t.key for t in targets} & {k for lo in left_out for k in lo.keys}


def test_default_targets_versus_peft_all_linear(tiny_mixtral):
    """PEFT 0.21's all-linear on the loaded Mixtral adapts our targets plus exactly what we leave out.

    The extra ones are parameter wrappers (``target_parameters``) on the fused experts and on the
    routers, which are not ``nn.Linear`` in transformers 5.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    peft_targets = {
        n.removeprefix("base_model.model.").removesuffix(".base_layer")
        for n, m in peft_model.named_modules()
        if hasattr(m, "lora_A")
    }
    ours = {t.module for t in convertible_layers(open_checkpoint(tiny_mixtral))[0]}
    assert ours <= peft_targets
    assert peft_targets - ours == {f"model.layers.{i}.mlp.{m}" for i in (0, 1) for m in ("gate", "experts")}


def _meta_checkpoint(model_type: str) -> Checkpoint:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, vocab_size=128, num_local_experts=4, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64,
    ).to_dict()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    tensors = {k: TensorInfo(k, "model.safetensors", "F32", tuple(t.shape)) for k, t in model.state_dict().items()}
    return Checkpoint(Path("."), config, "safetensors", ("model.safetensors",), tensors, {}, (), {})


def test_router_that_is_a_linear_module_is_left_out_too():
    """phimoe's router is an nn.Linear [4, 64] (PEFT's all-linear would take it): still left out."""
    targets, left_out = convertible_layers(_meta_checkpoint("phimoe"))
    assert not any(t.short_name == "router" for t in targets)
    router = next(lo for lo in left_out if lo.kind == ROUTER)
    assert router.patterns() == ["model.layers.*.mlp.router.weight"]


def test_shared_experts_are_ordinary_targets():
    """qwen2_moe: the shared expert's dense MLP is converted; the routed experts are not."""
    targets, left_out = convertible_layers(_meta_checkpoint("qwen2_moe"))
    assert {"model.layers.0.mlp.shared_expert.gate_proj", "model.layers.0.mlp.shared_expert.down_proj"} <= {
        t.module for t in targets
    }
    experts = next(lo for lo in left_out if lo.kind == EXPERTS)
    assert experts.patterns() == ["model.layers.*.mlp.experts.down_proj", "model.layers.*.mlp.experts.gate_up_proj"]


def test_dense_model_leaves_nothing_out(tiny_llama):
    targets, left_out = convertible_layers(open_checkpoint(tiny_llama))
    assert left_out == [] and len(targets) == 14


@pytest.mark.parametrize(("fixture", "name"), [
    ("tiny_mixtral", "w1"), ("tiny_mixtral", "experts"), ("tiny_mixtral", "experts.0.w2"),
    ("tiny_mixtral", "block_sparse_moe"), ("tiny_mixtral", "gate"),
    ("tiny_mixtral_fused", "gate_up_proj"), ("tiny_mixtral_fused", "experts"), ("tiny_mixtral_fused", "gate"),
])
def test_targets_naming_left_out_layers_are_refused(fixture, name, request):
    targets, left_out = convertible_layers(open_checkpoint(request.getfixturevalue(fixture)))
    with pytest.raises(TargetError) as err:
        select_targets(targets, ("q_proj", name), left_out)
    (problem,) = err.value.problems()
    assert problem.startswith(f"--targets {name!r} names ")
    assert "not supported yet" in problem or "by design" in problem
    assert err.value.fix == f"choose from: {', '.join(ATTENTION)} (or full module paths)"
    assert len(select_targets(targets, ("q_proj", "layers.1.self_attn.v_proj"), left_out)) == 3


def test_cli_refuses_expert_targets_in_one_line(tiny_mixtral, tmp_path, capsys):
    out = tmp_path / "out"
    code = run(["convert", "-q", str(tiny_mixtral), str(out), "--targets", "q_proj,w1", "--rank", "4"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    assert err[0] == (
        "error: --targets 'w1' names expert matrices (e.g. model.layers.*.block_sparse_moe.experts.*.w1.weight): "
        "MoE experts are not supported yet — choose from: k_proj, o_proj, q_proj, v_proj (or full module paths)"
    )
    assert not out.exists()


def test_mixtral_bundle_says_what_was_left_out(tiny_mixtral, tmp_path, capsys):
    """Summary line, pissa.json, card; verify passes; the experts are the source's; PEFT loads it exactly."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "bundle"
    assert run(["convert", "-q", str(tiny_mixtral), str(out), "--rank", "4", "--svd", "exact"]) == 0
    summary = capsys.readouterr().out.splitlines()
    left_line = next(line for line in summary if line.startswith("left out"))
    assert left_line.split(None, 2)[2].strip() == (
        f"{EXPERT_LINE}; 2 router matrices (MoE routers are left out by design: tokens are routed exactly as "
        "in the source)"
    )

    record = json.loads((out / "pissa.json").read_text())
    assert len(record["matrices"]) == 8
    assert record["adapter"]["target_modules"] == ATTENTION
    assert record["left_out"] == [
        {"kind": "moe_experts", "count": 24, "tensors": 24, "reason": "MoE experts are not supported yet",
         "patterns": [f"model.layers.*.block_sparse_moe.experts.*.{w}.weight" for w in ("w1", "w2", "w3")]},
        {"kind": "moe_router", "count": 2, "tensors": 2,
         "reason": "MoE routers are left out by design: tokens are routed exactly as in the source",
         "patterns": ["model.layers.*.block_sparse_moe.gate.weight"]},
    ]
    card = (out / "README.md").read_text()
    assert f"| left out | {EXPERT_LINE};" in card and "## Left out" in card
    assert "| `model.layers.*.block_sparse_moe.experts.*.w1.weight`, " in card

    report = verify_bundle(out, source=str(tiny_mixtral))
    assert report.matrices == 8 and report.max_rel_error < 1e-5

    source, residual = load_file(tiny_mixtral / "model.safetensors"), load_file(out / "model.safetensors")
    for key in source:
        if ".experts." in key or key.endswith("gate.weight"):
            assert torch.equal(source[key], residual[key]), key

    original = AutoModelForCausalLM.from_pretrained(tiny_mixtral, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, out, subfolder="pissa_init", is_trainable=True)
    ids = torch.arange(24).reshape(2, 12)
    torch.testing.assert_close(_logits(model, ids), _logits(original, ids), atol=1e-5, rtol=0)


def test_fused_mixtral_bundle_verifies(tiny_mixtral_fused, tmp_path):
    out = tmp_path / "bundle"
    report = convert(tiny_mixtral_fused, out, ConvertOptions(rank=4, svd="exact"), progress=False)
    assert report.matrices == 8
    assert [(e["kind"], e["count"], e["tensors"]) for e in report.left_out] == [("moe_experts", 16, 4), ("moe_router", 2, 2)]
    assert verify_bundle(out, source=str(tiny_mixtral_fused)).max_rel_error < 1e-5


def test_verify_checks_the_left_out_record(tiny_mixtral, tmp_path):
    out = tmp_path / "bundle"
    convert(tiny_mixtral, out, ConvertOptions(rank=4, svd="exact"), progress=False)
    path = out / "pissa.json"
    record = json.loads(path.read_text())
    record["left_out"][0]["count"] = 20
    record["left_out"][1]["patterns"] = ["model.layers.*.self_attn.q_proj.weight"]
    path.write_text(json.dumps(record))
    with pytest.raises(VerificationError) as err:
        verify_bundle(out)
    problems = err.value.problems()
    assert any("24 matrices" in p and "says 24 / 20" in p for p in problems), problems
    assert "model.layers.0.self_attn.q_proj.weight: recorded both as converted and as left out" in problems


def test_dense_bundle_records_nothing_left_out(tiny_llama_bundle):
    assert json.loads((tiny_llama_bundle / "pissa.json").read_text())["left_out"] == []
    assert "Left out" not in (tiny_llama_bundle / "README.md").read_text()
