"""QPiSSA and QLoRA training on CPU (bitsandbytes), tiny Llama:

- a packed QPiSSA bundle trains QLoRA-style: its target layers are frozen ``Linear4bit`` holding the
  converter's Q, only the adapter (float32) has gradients, the loss decreases, the adapter is saved;
- ``--init qlora`` on the plain bundle of the same source: NF4 of the original weights (bitwise
  bitsandbytes' NF4 of ``W_res + s·B₀A₀`` in float32) + a fresh LoRA, the loss decreases;
- ``pissa export`` of the QPiSSA run gives the exact rank-2r LoRA for the original base, and its record
  reports per layer ``‖deq(Q) + s·B₀A₀ − W‖ / ‖ΔW‖``, checked against that norm computed here from
  the source, the packed residual and both adapters;
- refused in one line: ``--init lora/qlora`` on a QPiSSA bundle, ``--merge`` of a packed QPiSSA run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("bitsandbytes")

from converter.convert import convert  # noqa: E402
from converter.export import export  # noqa: E402
from converter.options import ConvertOptions  # noqa: E402
from converter.qpack import dequantize_packed  # noqa: E402
from pissa.cli import run  # noqa: E402
from pissa.core.errors import ExportError  # noqa: E402
from pissa.core.formats import adapter as adapter_format  # noqa: E402
from pissa.core.formats import bundle as B  # noqa: E402
from pissa.core.jsonio import read_json  # noqa: E402
from training.metrics import read_metrics  # noqa: E402
from training.train import train  # noqa: E402

FAST = dict(lr=2e-2, batch_size=4, max_length=64, log_every=1, seed=0, max_steps=6)


def _losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir) if "loss" in m]


def _decreased(ls: list[float]) -> bool:
    return sum(ls[-2:]) / 2 < sum(ls[:2]) / 2 - 0.15


@pytest.fixture(scope="module")
def packed(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("qtrain") / "qpissa"
    convert(tiny_llama, out, ConvertOptions(rank=8, svd="exact", quantize="nf4"), progress=False)
    return out


@pytest.fixture(scope="module")
def qpissa_run(packed: Path, arith_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("qtrain") / "run"
    result = train(packed, arith_data, out, progress=False, **FAST)
    assert result.steps == 6
    return out


def test_qpissa_trains_on_the_frozen_4bit_residual(packed: Path, qpissa_run: Path) -> None:
    import bitsandbytes as bnb

    from pissa.core.formats.bundle import open_bundle
    from training.options import TrainOptions
    from training.train import load_model

    ls = _losses(qpissa_run)
    assert len(ls) == 6 and _decreased(ls), ls
    trained = load_file(qpissa_run / "adapter" / adapter_format.WEIGHTS)
    init = load_file(packed / B.INIT_DIR / adapter_format.WEIGHTS)
    assert trained.keys() == init.keys() and any(not torch.equal(trained[k], init[k]) for k in init)
    assert all(t.dtype == torch.float32 for t in trained.values())
    model = load_model(open_bundle(packed), TrainOptions())
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14 and all(m.compute_dtype == torch.float32 for m in layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_qlora_baseline_trains_on_nf4_of_the_original(
    tiny_llama: Path, tiny_llama_bundle: Path, arith_data: Path, tmp_path: Path
) -> None:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    from pissa.core.formats.bundle import open_bundle
    from training.options import TrainOptions
    from training.train import load_model, load_original_model

    model = load_model(open_bundle(tiny_llama_bundle), TrainOptions(init="qlora"))
    layer = model.get_submodule("base_model.model.model.layers.1.mlp.down_proj").base_layer
    assert isinstance(layer, bnb.nn.Linear4bit)
    w = load_original_model(open_bundle(tiny_llama_bundle)).model.layers[1].mlp.down_proj.weight.detach()
    ref_packed, ref_state = F.quantize_4bit(w.float(), blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(layer.weight.data, ref_packed)
    assert torch.equal(F.dequantize_4bit(layer.weight.data, layer.weight.quant_state), F.dequantize_4bit(ref_packed, ref_state))
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    out = tmp_path / "qlora"
    result = train(tiny_llama_bundle, arith_data, out, init="qlora", progress=False, **FAST)
    assert _decreased(_losses(out)), _losses(out)
    assert result.init == "qlora" and (out / "adapter" / adapter_format.WEIGHTS).is_file()
    assert read_json(out / "adapter" / "pissa_training.json")["init"] == "qlora"
    with pytest.raises(ExportError, match="already is an adapter"):
        export(out, tmp_path / "exported")


def test_export_reports_the_quantization_gap(packed: Path, qpissa_run: Path, tiny_llama: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lora"
    assert run(["export", str(qpissa_run), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "‖deq(Q) + s·B₀A₀ − W‖/‖ΔW‖" in stdout
    record = read_json(out / "pissa_export.json")
    assert record["mode"] == "exact" and record["rank"] == 16
    bundle_record = read_json(packed / B.RECORD)
    scaling = bundle_record["adapter"]["scaling"]
    source = load_file(tiny_llama / "model.safetensors")
    residual = load_file(packed / "model.safetensors")
    init = load_file(packed / B.INIT_DIR / adapter_format.WEIGHTS)
    trained = load_file(qpissa_run / "adapter" / adapter_format.WEIGHTS)
    by_name = {m["name"]: m for m in bundle_record["matrices"]}
    gaps = []
    for layer in record["layers"]:
        m = by_name[layer["name"]]
        a_key, b_key = (adapter_format.adapter_key(m["name"], x) for x in ("lora_A", "lora_B"))
        w0 = dequantize_packed(residual.__getitem__, m["key"], "nf4", False) + scaling * (init[b_key] @ init[a_key])
        delta = scaling * (trained[b_key] @ trained[a_key] - init[b_key] @ init[a_key])
        want = float((w0 - source[m["key"]]).norm() / delta.norm())
        assert layer["quant_gap"] == pytest.approx(want, rel=1e-3), layer["name"]
        gaps.append(want)
    assert record["quantization"]["max_quant_gap"] == pytest.approx(max(gaps), rel=1e-3)
    # The exported adapter is ΔW on the original base: W + ΔW differs from the trained QPiSSA model by the gap.
    exported = load_file(out / adapter_format.WEIGHTS)
    layer = record["layers"][0]
    a_key, b_key = (adapter_format.adapter_key(layer["name"], x) for x in ("lora_A", "lora_B"))
    s_out = record["lora_alpha"] / record["rank"]
    m = by_name[layer["name"]]
    delta = scaling * (trained[b_key] @ trained[a_key] - init[b_key] @ init[a_key])
    torch.testing.assert_close(s_out * (exported[b_key] @ exported[a_key]), delta, rtol=0, atol=1e-5)


def test_refusals(packed: Path, qpissa_run: Path, arith_data: Path, tmp_path: Path,
                  capsys: pytest.CaptureFixture[str]) -> None:
    for init in ("lora", "qlora"):
        out = tmp_path / init
        code = run(["train", str(packed), "--data", str(arith_data), "--out", str(out), "--init", init, "--max-steps", "1"])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2 and len(err) == 1 and "without --quantize" in err[0], err
        assert not out.exists()
    code = run(["export", str(qpissa_run), "--out", str(tmp_path / "merged"), "--merge"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code != 0 and len(err) == 1 and "--merge" in err[0], err
    assert not (tmp_path / "merged").exists()
