"""``pissa convert --quantize nf4`` without ``--residual-dtype``: the residual packed in bitsandbytes' 4-bit layout.

- the file holds exactly the Q that :func:`converter.qpissa.qpissa_split` fitted the adapter to: the
  packed codes, absmax (and nested state) are bitwise its QuantState's, and the layer transformers loads
  dequantizes to its float32 ``deq(Q)`` bit for bit;
- bundle + ``PeftModel.from_pretrained(subfolder="pissa_init")`` (CPU) gives the logits of a float32 model
  whose target weights are ``deq(Q) + s·BA`` computed directly: max |Δ| ≤ 1e-5 · max |logit| through
  bitsandbytes' dequantize-then-matmul path; its CPU inference shortcut (AVX512-BF16 machines, eval
  mode without gradients: the weight is repacked and multiplied in bfloat16) stays within 2e-2;
- ``pissa verify --source`` accepts it (dequantizing by bitsandbytes) and rejects a bundle whose packed
  bytes were changed;
- partial targets: the other Linear layers stay float (``llm_int8_skip_modules``) and the model loads;
- two workers and a write failure + ``--resume`` give the same files as one uninterrupted process;
- Conv1D (GPT-2) is refused packed: one line, exit 2, nothing at OUT.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("bitsandbytes")

from test_convert_parallel import assert_same_bundle  # noqa: E402

from converter.convert import convert, staging_path  # noqa: E402
from converter.factorize import lora_scaling  # noqa: E402
from converter.options import ConvertOptions, QuantOptions  # noqa: E402
from converter.qpissa import qpissa_split  # noqa: E402
from converter.shard import matrix_seed  # noqa: E402
from converter.svd import SvdOptions  # noqa: E402
from converter.verify import verify_bundle  # noqa: E402
from pissa.cli import run  # noqa: E402
from pissa.core.errors import VerificationError  # noqa: E402
from pissa.core.formats import adapter as adapter_format  # noqa: E402
from pissa.core.formats import bundle as B  # noqa: E402
from pissa.core.formats import nf4  # noqa: E402
from pissa.core.jsonio import read_json, write_json  # noqa: E402

PACKED = dict(quantize="nf4", quant_iters=2, double_quant=True)


def _tensors(bundle: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(bundle.glob("model*.safetensors")):
        out.update(load_file(f))
    return out


def _module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    return model.get_submodule(name)


@pytest.fixture(scope="module")
def pbundle(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("qpacked") / "bundle"
    convert(tiny_llama, out, ConvertOptions(rank=8, alpha=16, **PACKED), progress=False)
    return out


def test_layout_and_record(pbundle: Path) -> None:
    record = read_json(pbundle / B.RECORD)
    q = record[B.QUANT_KEY]
    assert q["storage"] == B.STORAGE_PACKED and q["residual_dtype"] is None and q["double_quant"] is True
    config = read_json(pbundle / "config.json")["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["load_in_4bit"] and config["bnb_4bit_quant_type"] == "nf4"
    assert config["bnb_4bit_use_double_quant"] is True and config["llm_int8_skip_modules"] is None  # every Linear is a target
    tensors = _tensors(pbundle)
    m = record["matrices"][0]
    key, (out_f, in_f) = m["key"], m["shape"]
    assert tensors[key].dtype == torch.uint8 and tuple(tensors[key].shape) == (out_f * in_f // 2, 1)
    blocks = out_f * in_f // 64
    assert tensors[f"{key}.absmax"].dtype == torch.uint8 and tuple(tensors[f"{key}.absmax"].shape) == (blocks,)
    assert tuple(tensors[f"{key}.nested_absmax"].shape) == (-(-blocks // 256),)
    assert tuple(tensors[f"{key}.quant_map"].shape) == (16,) and tuple(tensors[f"{key}.nested_quant_map"].shape) == (256,)
    raw = bytes(tensors[f"{key}.quant_state.bitsandbytes__nf4"].numpy()).decode()
    import json

    state = json.loads(raw)
    assert state["shape"] == [out_f, in_f] and state["blocksize"] == 64 and state["dtype"] == nf4.STATE_DTYPE
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32  # non-targets are copied, not quantized


def test_loads_exactly_the_fitted_q(pbundle: Path, tiny_llama: Path) -> None:
    """transformers' loaded Linear4bit dequantizes to the deq(Q) the adapter was fitted to, bit for bit."""
    import bitsandbytes.functional as F
    from transformers import AutoModelForCausalLM

    record = read_json(pbundle / B.RECORD)
    model = AutoModelForCausalLM.from_pretrained(pbundle, device_map="cpu")
    source = load_file(tiny_llama / "model.safetensors")
    adapter = load_file(pbundle / B.INIT_DIR / adapter_format.WEIGHTS)
    scaling = lora_scaling(16, 8, False)
    for m in record["matrices"][::3]:
        ref = qpissa_split(
            source[m["key"]], rank=8, scaling=scaling, svd=SvdOptions(), quant=QuantOptions(iters=2, double_quant=True),
            seed=matrix_seed(0, m["key"]),
        )
        weight = _module(model, m["name"]).weight
        assert type(weight).__name__ == "Params4bit"
        assert torch.equal(weight.data.reshape(-1), ref.quantized.packed.reshape(-1))
        loaded = F.dequantize_4bit(weight.data, weight.quant_state)
        assert loaded.dtype == torch.float32 and torch.equal(loaded, ref.quantized.dequantized)
        assert torch.equal(adapter[adapter_format.adapter_key(m["name"], "lora_A")], ref.lora_A)
        assert torch.equal(adapter[adapter_format.adapter_key(m["name"], "lora_B")], ref.lora_B)


def test_peft_logits_equal_dequantized_plus_adapter(pbundle: Path, tiny_llama: Path) -> None:
    """Bundle + PEFT (CPU, bitsandbytes) against a float32 model with W = deq(Q) + s·BA written in directly."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from converter.qpack import dequantize_packed

    record = read_json(pbundle / B.RECORD)
    quantized = AutoModelForCausalLM.from_pretrained(pbundle, device_map="cpu")
    peft_model = PeftModel.from_pretrained(quantized, pbundle, subfolder=B.INIT_DIR)
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    tensors = _tensors(pbundle)
    adapter = load_file(pbundle / B.INIT_DIR / adapter_format.WEIGHTS)
    scaling = record["adapter"]["scaling"]
    with torch.no_grad():
        for m in record["matrices"]:
            deq = dequantize_packed(tensors.__getitem__, m["key"], "nf4", True)
            a = adapter[adapter_format.adapter_key(m["name"], "lora_A")]
            b = adapter[adapter_format.adapter_key(m["name"], "lora_B")]
            _module(reference, m["name"]).weight.copy_(deq + scaling * (b @ a))
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    shortcut = {n: mod.support_avx512bf16_for_cpu for n, mod in quantized.named_modules() if hasattr(mod, "support_avx512bf16_for_cpu")}
    assert len(shortcut) == len(record["matrices"])
    for name in shortcut:
        quantized.get_submodule(name).support_avx512bf16_for_cpu = False
    with torch.no_grad():
        got = peft_model(input_ids=ids).logits.float()
        want = reference(input_ids=ids).logits.float()
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), float((got - want).abs().max())
        for name, value in shortcut.items():
            quantized.get_submodule(name).support_avx512bf16_for_cpu = value
        fast = peft_model(input_ids=ids).logits.float()
    assert (fast - want).abs().max() <= 2e-2 * want.abs().max(), float((fast - want).abs().max())
    # and not the source model's: the quantization error is visible
    source_logits = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)(input_ids=ids).logits
    assert (source_logits - want).abs().max() > 1e-2 * want.abs().max()


def test_verify_packed(pbundle: Path, tiny_llama: Path, tmp_path: Path) -> None:
    record = read_json(pbundle / B.RECORD)
    report = verify_bundle(pbundle, str(tiny_llama))
    assert report.max_rel_error == pytest.approx(max(m["rel_error"] for m in record["matrices"]), rel=1e-2)
    # Changed packed codes, checksums re-recorded so only the dequantized reconstruction can notice.
    import shutil

    from converter.stio import SafetensorsWriter
    from pissa.core.hashing import sha256_file

    bad = tmp_path / "bad"
    shutil.copytree(pbundle, bad)
    tensors = load_file(bad / "model.safetensors")
    key = record["matrices"][0]["key"]
    tensors[key] = torch.where(torch.arange(tensors[key].numel()).reshape(-1, 1) % 3 == 0, 0x77, tensors[key]).to(torch.uint8)
    layout = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    with SafetensorsWriter(bad / "model.safetensors", layout, {"format": "pt"}) as w:
        for k, t in tensors.items():
            w.write(k, t)
    record["files"]["model.safetensors"] = sha256_file(bad / "model.safetensors")
    write_json(bad / B.RECORD, record)
    with pytest.raises(VerificationError) as err:
        verify_bundle(bad, str(tiny_llama))
    assert any(record["matrices"][0]["name"] in p for p in err.value.problems()), err.value.problems()


def test_partial_targets_keep_other_linears_float(tiny_llama: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "qv"
    convert(tiny_llama, out, ConvertOptions(rank=8, targets=("q_proj", "v_proj"), quantize="nf4"), progress=False)
    skip = read_json(out / "config.json")["quantization_config"]["llm_int8_skip_modules"]
    assert "lm_head" in skip and "model.layers.0.mlp.down_proj" in skip and "model.layers.0.self_attn.q_proj" not in skip
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert type(model.model.layers[1].self_attn.v_proj).__name__ == "Linear4bit"
    assert type(model.model.layers[1].self_attn.k_proj) is torch.nn.Linear
    source = load_file(tiny_llama / "model.safetensors")
    assert torch.equal(model.model.layers[1].self_attn.k_proj.weight, source["model.layers.1.self_attn.k_proj.weight"])
    verify_bundle(out, str(tiny_llama))


def test_workers_and_resume_give_the_same_packed_bundle(
    tiny_llama_sharded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from converter import stio

    options = dict(rank=8, seed=3, quantize="nf4")
    convert(tiny_llama_sharded, tmp_path / "one", ConvertOptions(**options), progress=False)
    convert(tiny_llama_sharded, tmp_path / "two", ConvertOptions(workers=2, **options), progress=False)
    assert_same_bundle(tmp_path / "two", tmp_path / "one")

    calls = {"n": 0}
    real_write = stio.SafetensorsWriter.write

    def failing_write(self, key, tensor):  # noqa: ANN001
        calls["n"] += 1
        if calls["n"] == 60:
            raise OSError(28, "No space left on device")
        return real_write(self, key, tensor)

    monkeypatch.setattr(stio.SafetensorsWriter, "write", failing_write)
    out = tmp_path / "resumed"
    args = ["convert", "-q", str(tiny_llama_sharded), str(out), "--rank", "8", "--seed", "3", "--quantize", "nf4"]
    assert run(args) != 0 and not out.exists() and staging_path(out).exists()
    monkeypatch.setattr(stio.SafetensorsWriter, "write", real_write)
    assert run([*args, "--resume"]) == 0
    assert_same_bundle(out, tmp_path / "one")


def test_conv1d_refused_packed(tiny_gpt2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "gpt2"
    code = run(["convert", "-q", str(tiny_gpt2), str(out), "--rank", "4", "--quantize", "nf4"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "Conv1D" in err[0] and "--residual-dtype" in err[0], err
    assert not out.exists() and not staging_path(out).exists()


def test_serve_refuses_a_packed_bundle_in_one_line(pbundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # vLLM's CPU build refuses a bitsandbytes model only after start-up, and the adapter checks read the packed
    # bytes' shapes ([N, 1]): one line per module. pissa serve refuses the base itself, before anything starts.
    code = run(["serve", "--base", str(pbundle), "--adapter", f"run={pbundle / B.INIT_DIR}", "--dry-run"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    assert "packed in 4 bits" in err[0] and "pissa export" in err[0] and "do not fit" not in err[0], err


def test_serve_refuses_any_bitsandbytes_base(tiny_llama: Path, tmp_path: Path) -> None:
    import shutil

    from pissa.core.errors import AdapterValidationError
    from serving.validate import read_base

    base = tmp_path / "bnb"
    shutil.copytree(tiny_llama, base)
    config = read_json(base / "config.json")
    write_json(base / "config.json", {**config, "quantization_config": nf4.quantization_config("nf4", False, "float32", None)})
    with pytest.raises(AdapterValidationError) as info:
        read_base(str(base), is_local=True)
    assert info.value.problems() == [f"base {str(base)!r} holds bitsandbytes-quantized weights, which pissa serve "
                                     "cannot serve"]
    read_base(str(tiny_llama), is_local=True)  # the same model unquantized is served
