"""Export: PiSSA (residual + trained adapter) → LoRA on the original base.

The claims checked here, with their tolerances:

- maths (float64): ``[B′, −B₀][A′; A₀] = B′A′ − B₀A₀``; the factor-only SVD of ΔW equals the dense
  SVD of ΔW; the recorded truncation error equals ``‖ΔW − ΔW_K‖_F / ‖ΔW‖_F`` computed densely;
- exact export equals PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)``
  tensor for tensor (``torch.equal``) and in r / lora_alpha;
- logits of (original base + exported LoRA) equal logits of (residual + trained PiSSA adapter),
  fp32, atol 1e-4 (Llama and GPT-2 Conv1D with rsLoRA);
- ``--merge`` gives the same logits as full weights in the base's layout;
- refusals: not from a bundle, init mismatch, shape mismatch, plain-LoRA runs.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from converter.export import export
from converter.export_math import (
    VLLM_LORA_RANKS,
    delta_svd,
    exact_delta_factors,
    exported_alpha,
    pick_auto_rank,
    truncate_delta,
)
from pissa.cli import run
from pissa.core.errors import ExportError, InvalidOptionsError, OutputExistsError
from pissa.core.formats.bundle import open_bundle
from pissa.core.formats.run import write_training_record

ATOL_LOGITS = 1e-4


# --- pure maths ---------------------------------------------------------------------------------
def _factors(out_f: int = 40, in_f: int = 30, r: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a0 = torch.randn(r, in_f, generator=g, dtype=torch.float64)
    b0 = torch.randn(out_f, r, generator=g, dtype=torch.float64)
    a1 = a0 + 0.1 * torch.randn(r, in_f, generator=g, dtype=torch.float64)
    b1 = b0 + 0.1 * torch.randn(out_f, r, generator=g, dtype=torch.float64)
    return a1, b1, a0, b0


def test_exact_factors_reproduce_delta():
    """[B′, −B₀] [A′; A₀] = B′A′ − B₀A₀ (float64, 1e-12)."""
    a1, b1, a0, b0 = _factors()
    a, b = exact_delta_factors(a1, b1, a0, b0)
    assert a.shape == (8, 30) and b.shape == (40, 8)
    torch.testing.assert_close(b @ a, b1 @ a1 - b0 @ a0, atol=1e-12, rtol=0)
    assert exported_alpha(16.0, False) == 32.0
    assert math.isclose(exported_alpha(16.0, True) / math.sqrt(8), 16.0 / math.sqrt(4))


def test_exact_factors_refuse_shape_mismatch():
    a1, b1, a0, b0 = _factors()
    with pytest.raises(ValueError, match="differ"):
        exact_delta_factors(a1, b1, a0[:3], b0[:, :3])


@pytest.mark.parametrize("shape", [(40, 30), (12, 50)])
def test_factor_svd_equals_dense_svd(shape):
    """The SVD built from QR(factors) + SVD(core) equals the dense SVD of ΔW (float64).

    Also the error of keeping K triples, √(Σ_{i>K}σ²)/√(Σσ²), equals ‖ΔW − s·B_K A_K‖/‖ΔW‖ computed
    densely, and s·B_K A_K is the dense rank-K truncation (Eckart–Young).
    """
    a1, b1, a0, b0 = _factors(*shape, r=4, seed=1)
    s = 0.7
    dense = s * (b1 @ a1 - b0 @ a0)
    svd = delta_svd(a1, b1, a0, b0, s)
    torch.testing.assert_close(svd.u @ torch.diag(svd.s) @ svd.vh, dense, atol=1e-12, rtol=0)
    ref = torch.linalg.svdvals(dense)
    torch.testing.assert_close(svd.s, ref[: svd.s.shape[0]], atol=1e-12, rtol=0)
    u, sv, vh = torch.linalg.svd(dense, full_matrices=False)
    for k in (1, 3, 5, 8):
        a_k, b_k = truncate_delta(svd, k, scaling=2.0, dtype=torch.float64)
        approx = 2.0 * b_k @ a_k
        best = u[:, :k] @ torch.diag(sv[:k]) @ vh[:k]
        torch.testing.assert_close(approx, best, atol=1e-10, rtol=0)
        true_err = float(torch.linalg.matrix_norm(dense - approx) / torch.linalg.matrix_norm(dense))
        assert svd.rel_error(k) == pytest.approx(true_err, rel=1e-8, abs=1e-12)
    assert svd.rel_error(8) == pytest.approx(0.0, abs=1e-7)


def test_truncate_pads_narrow_layers():
    a1, b1, a0, b0 = _factors(6, 30, r=4)  # ΔW has at most 6 triples
    svd = delta_svd(a1, b1, a0, b0, 1.0)
    a, b = truncate_delta(svd, 8, 1.0, dtype=torch.float64)
    assert a.shape == (8, 30) and b.shape == (6, 8)
    torch.testing.assert_close(b @ a, b1 @ a1 - b0 @ a0, atol=1e-12, rtol=0)


def test_zero_delta_has_zero_error():
    a1, b1, _, _ = _factors()
    assert delta_svd(a1, b1, a1, b1, 1.0).rel_error(1) == 0.0


def test_pick_auto_rank():
    assert pick_auto_rank({1: 0.5, 8: 0.02, 16: 0.001}, 0.01) == 16
    assert pick_auto_rank({1: 0.5, 8: 0.02}, 0.01) is None
    assert pick_auto_rank({8: 0.0, 1: 0.0}, 0.0) == 1
    assert VLLM_LORA_RANKS == (1, 8, 16, 32, 64, 128, 256, 320, 512)


# --- on tiny models -----------------------------------------------------------------------------
def load_residual_with_adapter(bundle: Path, adapter: Path | None = None, *, trainable: bool = False):
    """Residual model + PiSSA adapter (``adapter`` or the bundle's pissa_init), fp32, eval mode."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(bundle, dtype=torch.float32)
    if adapter is None:
        model = PeftModel.from_pretrained(model, bundle, subfolder="pissa_init", is_trainable=trainable)
    else:
        model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
    return model.eval()


def base_with_adapter(base: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).eval()


def logits(model, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 320, (2, 17), generator=g)
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def fake_training(bundle: Path, workdir: Path, *, seed: int = 0, scale: float = 0.3) -> tuple[Path, Path]:
    """Move the pissa_init adapter as training would, save it (+ PEFT's own conversion).

    Returns ``(trained adapter folder, PEFT-converted adapter folder)``.
    """
    model = load_residual_with_adapter(bundle, trainable=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
    trained = workdir / "trained"
    model.save_pretrained(trained)
    write_training_record(trained, bundle=open_bundle(bundle), init="pissa", step=1)
    init_copy = workdir / "init" / "pissa_init"
    shutil.copytree(bundle / "pissa_init", init_copy)
    peft_out = workdir / "peft-converted"
    model.save_pretrained(peft_out, path_initial_model_for_weight_conversion=str(init_copy))
    return trained, peft_out


@pytest.fixture(scope="module")
def llama_trained(tmp_path_factory, tiny_llama_bundle):
    return fake_training(tiny_llama_bundle, tmp_path_factory.mktemp("llama-trained"))


@pytest.fixture(scope="module")
def llama_exact(tmp_path_factory, llama_trained):
    out = tmp_path_factory.mktemp("exports") / "exact"
    report = export(llama_trained[0], out)
    return out, report


def test_exact_export_equals_peft_conversion(llama_exact, llama_trained):
    """Tensor for tensor (torch.equal), same r and lora_alpha as PEFT's own conversion."""
    out, report = llama_exact
    _, peft_out = llama_trained
    ours, theirs = load_file(str(out / "adapter_model.safetensors")), load_file(str(peft_out / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys() and len(ours) == 28
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    cfg, peft_cfg = (json.loads((d / "adapter_config.json").read_text()) for d in (out, peft_out))
    assert (cfg["r"], cfg["lora_alpha"]) == (peft_cfg["r"], peft_cfg["lora_alpha"]) == (16, 16.0)
    assert report.mode == "exact" and report.rank == 16 and report.max_lora_rank == 16


def test_exact_export_config_follows_vllm_rules(llama_exact, tiny_llama):
    out, _ = llama_exact
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True
    assert cfg["use_dora"] is False
    assert "modules_to_save" not in cfg
    assert cfg["base_model_name_or_path"] == str(tiny_llama)
    record = json.loads((out / "pissa_export.json").read_text())
    assert record["mode"] == "exact" and record["max_rel_error"] == 0.0
    assert "base_model: " + str(tiny_llama) in (out / "README.md").read_text()


def test_exact_export_logits_match_on_original_base(llama_exact, llama_trained, tiny_llama_bundle, tiny_llama):
    """base + exported LoRA ≡ residual + trained PiSSA adapter (fp32, atol 1e-4), and training moved them."""
    out, _ = llama_exact
    trained, _ = llama_trained
    ref = logits(load_residual_with_adapter(tiny_llama_bundle, trained))
    got = logits(base_with_adapter(tiny_llama, out))
    torch.testing.assert_close(got, ref, atol=ATOL_LOGITS, rtol=0)
    from transformers import AutoModelForCausalLM

    plain = logits(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval())
    assert (plain - ref).abs().max() > 100 * ATOL_LOGITS  # the fake training changed the model


def test_gpt2_rslora_export_logits_match(tmp_path, tiny_gpt2_bundle, tiny_gpt2):
    """Conv1D (fan_in_fan_out) and rsLoRA (alpha → √2·alpha): logits still match, and PEFT agrees."""
    trained, peft_out = fake_training(tiny_gpt2_bundle, tmp_path)
    report = export(trained, tmp_path / "out")
    cfg, peft_cfg = (json.loads((d / "adapter_config.json").read_text()) for d in (tmp_path / "out", peft_out))
    assert cfg["use_rslora"] is True and cfg["fan_in_fan_out"] is True
    assert cfg["lora_alpha"] == pytest.approx(peft_cfg["lora_alpha"]) == pytest.approx(8 * math.sqrt(2))
    ours, theirs = load_file(str(tmp_path / "out/adapter_model.safetensors")), load_file(str(peft_out / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    ref = logits(load_residual_with_adapter(tiny_gpt2_bundle, trained))
    got = logits(base_with_adapter(tiny_gpt2, tmp_path / "out"))
    torch.testing.assert_close(got, ref, atol=ATOL_LOGITS, rtol=0)
    assert report.rank == 8


def _dense_deltas(trained: Path, bundle: Path) -> dict[str, torch.Tensor]:
    t = load_file(str(trained / "adapter_model.safetensors"))
    i = load_file(str(bundle / "pissa_init" / "adapter_model.safetensors"))
    cfg = json.loads((trained / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / cfg["r"]
    out = {}
    for key in t:
        if ".lora_A." in key:
            kb = key.replace(".lora_A.", ".lora_B.")
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            out[module] = s * (t[kb].double() @ t[key].double() - i[kb].double() @ i[key].double())
    return out


def test_rank_k_error_is_true_truncation_error(tmp_path, llama_trained, tiny_llama_bundle):
    """Per layer, the recorded error equals ‖ΔW − ΔW_K‖/‖ΔW‖ of the written adapter (dense, float64)
    and equals the dense SVD's tail √(Σ_{i>K}σ²)/‖ΔW‖ (the best possible at rank K)."""
    trained, _ = llama_trained
    report = export(trained, tmp_path / "k4", rank=4)
    assert report.mode == "compressed" and report.rank == 4
    written = load_file(str(tmp_path / "k4/adapter_model.safetensors"))
    cfg = json.loads((tmp_path / "k4/adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 4.0 and cfg["use_rslora"] is False
    record = {e["name"]: e["rel_error"] for e in json.loads((tmp_path / "k4/pissa_export.json").read_text())["layers"]}
    deltas = _dense_deltas(trained, tiny_llama_bundle)
    assert record.keys() == deltas.keys()
    for module, dense in deltas.items():
        a = written[f"base_model.model.{module}.lora_A.weight"].double()
        b = written[f"base_model.model.{module}.lora_B.weight"].double()
        actual = float(torch.linalg.matrix_norm(dense - b @ a) / torch.linalg.matrix_norm(dense))
        sv = torch.linalg.svdvals(dense)
        tail = float(sv[4:].square().sum().sqrt() / sv.square().sum().sqrt())
        assert record[module] == pytest.approx(tail, rel=1e-6)
        assert actual == pytest.approx(tail, rel=1e-4)  # written in float32
        assert 0.05 < record[module] < 1


def test_rank_auto_picks_smallest_vllm_rank(tmp_path, llama_trained, tiny_llama_bundle):
    trained, _ = llama_trained
    deltas = _dense_deltas(trained, tiny_llama_bundle)

    def worst(k: int) -> float:
        return max(float(torch.linalg.svdvals(d)[k:].square().sum().sqrt() / d.norm()) for d in deltas.values())

    tol = 0.5 * (worst(1) + worst(8))  # 8 passes, 1 does not
    assert worst(8) < tol < worst(1)
    report = export(trained, tmp_path / "auto", rank="auto", tol=tol)
    assert report.rank == 8 and report.mode == "compressed" and report.max_lora_rank == 8
    assert report.max_rel_error == pytest.approx(worst(8), rel=1e-6)
    assert report.candidates[1] == pytest.approx(worst(1), rel=1e-6)
    tight = export(trained, tmp_path / "auto-tight", rank="auto", tol=1e-6)
    assert tight.rank == 16 and tight.mode == "exact"  # 2r = 16 is a vLLM rank: exact


def test_merge_matches_residual_plus_adapter(tmp_path, llama_trained, tiny_llama_bundle):
    trained, _ = llama_trained
    report = export(trained, tmp_path / "merged", merge=True)
    assert report.mode == "merged" and len(report.layers) == 14
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    ref = logits(load_residual_with_adapter(tiny_llama_bundle, trained))
    torch.testing.assert_close(logits(merged), ref, atol=ATOL_LOGITS, rtol=0)
    assert sorted(p.name for p in (tmp_path / "merged").glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "merged" / "pissa_init").exists()


# --- refusals -----------------------------------------------------------------------------------
def test_refuses_adapter_not_from_bundle(tmp_path, llama_trained):
    trained, _ = llama_trained
    loose = tmp_path / "loose"
    shutil.copytree(trained, loose)
    (loose / "pissa_training.json").unlink()
    cfg = json.loads((loose / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "some/hub-model"
    (loose / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="not an adapter trained from a PiSSA bundle"):
        export(loose, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_init_mismatch(tmp_path, llama_trained, tiny_llama_bundle, capsys):
    """A bundle whose pissa_init differs from the one the adapter was trained from is refused."""
    trained, _ = llama_trained
    other = tmp_path / "bundle"
    shutil.copytree(tiny_llama_bundle, other)
    init = load_file(str(other / "pissa_init/adapter_model.safetensors"))
    key = next(iter(init))
    init[key] = init[key] * 1.01
    save_file(init, str(other / "pissa_init/adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ExportError, match="changed since conversion") as err:
        export(trained, tmp_path / "out", bundle=other)
    assert "different pissa_init" in str(err.value)
    assert not (tmp_path / "out").exists()
    assert run(["export", str(trained), "--out", str(tmp_path / "out"), "--bundle", str(other)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and "changed since conversion" in lines[0] and "different pissa_init" in lines[1]
    assert lines[2].startswith("error: 2 problems — export the adapter with the bundle it was trained from")


def test_refuses_shape_mismatch(tmp_path, tmp_path_factory, tiny_llama):
    """An adapter trained at rank 4 against a rank-8 bundle: shapes disagree; the first two are listed and the
    rest counted (every tensor was one line: 47 lines for a small model)."""
    from converter.convert import convert
    from converter.options import ConvertOptions

    b4 = tmp_path / "b4"
    convert(tiny_llama, b4, ConvertOptions(rank=4, svd="exact"), progress=False)
    trained, _ = fake_training(b4, tmp_path)
    b8 = tmp_path / "b8"
    convert(tiny_llama, b8, ConvertOptions(rank=8, svd="exact"), progress=False)
    with pytest.raises(ExportError) as err:
        export(trained, tmp_path / "out", bundle=b8)
    text = str(err.value)
    problems = err.value.problems()
    assert "r differs" in text and sum("trained shape" in p and "!= initial shape" in p for p in problems) == 2
    assert len(problems) == 6 and "more shapes that differ" in err.value.problems()[-1]


def test_refuses_lora_baseline_and_bad_options(tmp_path, llama_trained, tiny_llama_bundle):
    trained, _ = llama_trained
    lora = tmp_path / "lora"
    shutil.copytree(trained, lora)
    write_training_record(lora, bundle=open_bundle(tiny_llama_bundle), init="lora")
    with pytest.raises(ExportError, match="plain-LoRA baseline"):
        export(lora, tmp_path / "out")
    with pytest.raises(InvalidOptionsError) as err:
        export(trained, tmp_path / "out", rank="many", tol=2.0)
    assert len(err.value.problems()) == 2


def test_cli_export_and_output_exists(tmp_path, llama_trained, capsys):
    trained, _ = llama_trained
    assert run(["export", str(trained), "--out", str(tmp_path / "cli"), "--rank", "auto", "--tol", "0.9"]) == 0
    assert "--max-lora-rank" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli/adapter_config.json").read_text())["r"] in VLLM_LORA_RANKS
    with pytest.raises(OutputExistsError):
        export(trained, tmp_path / "cli")
    assert run(["export", str(trained), "--out", str(tmp_path / "cli")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_merge_keeps_shard_layout_and_conv1d(tmp_path, tiny_llama_sharded, tiny_gpt2_bundle):
    """--merge on a 6-shard source keeps shard names and index; on GPT-2 (Conv1D, Wᵀ stored) the
    merged weights give the logits of residual + trained adapter."""
    from transformers import AutoModelForCausalLM

    from converter.convert import convert
    from converter.options import ConvertOptions

    bundle = tmp_path / "sharded-bundle"
    convert(tiny_llama_sharded, bundle, ConvertOptions(rank=4, svd="exact"), progress=False)
    trained, _ = fake_training(bundle, tmp_path / "t1")
    export(trained, tmp_path / "m1", merge=True)
    shards = sorted(p.name for p in tiny_llama_sharded.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(p.name for p in (tmp_path / "m1").glob("*.safetensors")) == shards
    index = json.loads((tmp_path / "m1/model.safetensors.index.json").read_text())["weight_map"]
    assert index == json.loads((tiny_llama_sharded / "model.safetensors.index.json").read_text())["weight_map"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m1", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(merged), logits(load_residual_with_adapter(bundle, trained)),
                               atol=ATOL_LOGITS, rtol=0)

    trained, _ = fake_training(tiny_gpt2_bundle, tmp_path / "t2")
    export(trained, tmp_path / "m2", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m2", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(merged), logits(load_residual_with_adapter(tiny_gpt2_bundle, trained)),
                               atol=ATOL_LOGITS, rtol=0)
