"""``pissa export --merge``: streamed merged weights (converter/merge.py).

The claims checked here, with their tolerances:

- every merged weight equals PEFT's ``merge_and_unload`` of (residual + trained adapter) in float32
  to the residual dtype's rounding (bf16: rtol 2⁻⁸; fp32: rtol 2e-6, atol 1e-6), and is bit-identical
  (``torch.equal``) to ``(W_res.float() + s·B′.float() @ A′.float()).to(dtype)``, the formula the
  earlier in-memory merge used; every other tensor is the residual's, byte for byte;
- same tensor names, dtypes, shapes and shard split as the bundle; the index rewritten with the
  same weight map and the true total size; ``pissa_export.json`` holds the sha256 of every file;
- a damaged residual is refused with one typed error and nothing is left behind;
- peak memory of the merge (VmHWM) stays below half a shard on a multi-shard model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_export import fake_training

from converter.export import export
from pissa.core.errors import ExportError
from pissa.core.formats.bundle import open_bundle
from pissa.core.formats.run import write_training_record

# Tolerance of a merged weight against PEFT's fp32 merge: half a unit in the last place of the stored
# dtype (relative), plus float32 noise of computing s·B′A′ in another order.
TOL = {torch.float32: {"rtol": 2e-6, "atol": 1e-6}, torch.bfloat16: {"rtol": 2**-8, "atol": 1e-6}}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _shards(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(str(p)) for p in sorted(folder.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def bf16_sharded_bundle(tmp_path_factory, tiny_llama_sharded) -> Path:
    """tiny_llama_sharded (6 shards + index) converted with a bfloat16 residual, rank 4."""
    from converter.convert import convert
    from converter.options import ConvertOptions

    out = tmp_path_factory.mktemp("merge") / "bf16-bundle"
    convert(tiny_llama_sharded, out, ConvertOptions(rank=4, svd="exact", dtype="bfloat16"), progress=False)
    return out


@pytest.mark.parametrize("which", ["fp32-single", "bf16-sharded"])
def test_merge_equals_peft_merge_and_unload(tmp_path, which, tiny_llama_bundle, bf16_sharded_bundle):
    """Merged weights vs PEFT's merge_and_unload (fp32), tensor by tensor; layout, index and checksums."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    bundle = tiny_llama_bundle if which == "fp32-single" else bf16_sharded_bundle
    trained, _ = fake_training(bundle, tmp_path)
    report = export(trained, tmp_path / "merged", merge=True)
    out = tmp_path / "merged"

    ref_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bundle, dtype=torch.float32), trained)
    reference = {k: v.detach() for k, v in ref_model.merge_and_unload().state_dict().items()}
    adapter = load_file(str(trained / "adapter_model.safetensors"))
    cfg = json.loads((trained / "adapter_config.json").read_text())
    scaling = cfg["lora_alpha"] / cfg["r"]

    residual, merged = _shards(bundle), _shards(out)
    assert merged.keys() == residual.keys()  # same shard split (file names)
    targets = {f"{layer.name}.weight" for layer in report.layers}
    assert len(targets) == len(adapter) // 2 == 14
    seen = set()
    for shard, tensors in residual.items():
        assert merged[shard].keys() == tensors.keys(), shard
        with safe_open(str(bundle / shard), "pt") as a, safe_open(str(out / shard), "pt") as b:
            assert b.metadata() == a.metadata()
        for key, w_res in tensors.items():
            got = merged[shard][key]
            assert got.dtype == w_res.dtype and got.shape == w_res.shape, key
            if key not in targets:
                assert torch.equal(got, w_res), key  # copied unchanged
                continue
            seen.add(key)
            module = key.removesuffix(".weight")
            a_ = adapter[f"base_model.model.{module}.lora_A.weight"]
            b_ = adapter[f"base_model.model.{module}.lora_B.weight"]
            torch.testing.assert_close(got.float(), reference[key], **TOL[w_res.dtype])
            formula = (w_res.float() + scaling * (b_.float() @ a_.float())).to(w_res.dtype)
            assert torch.equal(got, formula), key
            assert not torch.equal(got, w_res), key  # the adapter moved it
    assert seen == targets

    record = json.loads((out / "pissa_export.json").read_text())
    written = {p.name for p in out.iterdir() if p.is_file()} - {"pissa_export.json", "README.md"}
    assert record["files"].keys() == written
    assert all(record["files"][name] == _sha256(out / name) for name in written)
    index = bundle / "model.safetensors.index.json"
    if index.exists():
        ours, theirs = (json.loads(p.read_text()) for p in (out / index.name, index))
        assert ours["weight_map"] == theirs["weight_map"]
        total = sum(t.numel() * t.element_size() for tensors in merged.values() for t in tensors.values())
        assert ours["metadata"]["total_size"] == theirs["metadata"]["total_size"] == total
    else:
        assert not (out / index.name).exists()


def test_merge_refuses_damaged_residual(tmp_path, llama_trained, tiny_llama_bundle):
    """A truncated residual shard, or one without a trained weight: one ExportError, nothing written."""
    trained, _ = llama_trained
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_llama_bundle, bundle)
    shard = bundle / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ExportError, match="truncated") as err:
        export(trained, tmp_path / "out", merge=True, bundle=bundle)
    assert "re-create the bundle" in (err.value.fix or "")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no temporary folder left

    tensors = load_file(str(tiny_llama_bundle / "model.safetensors"))
    del tensors["model.layers.1.self_attn.q_proj.weight"]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(ExportError, match="model.layers.1.self_attn.q_proj.weight: no such tensor"):
        export(trained, tmp_path / "out", merge=True, bundle=bundle)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def llama_trained(tmp_path_factory, tiny_llama_bundle):
    return fake_training(tiny_llama_bundle, tmp_path_factory.mktemp("llama-trained"))


PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from converter.export import export
    import converter.merge, converter.stio, safetensors.torch  # imported before the baseline

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident set
    before = status("VmRSS")
    export(sys.argv[1], sys.argv[2], merge=True)
    print(json.dumps({"before": before, "peak": status("VmHWM")}))
    """
)


def test_merge_peak_memory_below_half_a_shard(tmp_path):
    """Peak resident memory of ``export --merge`` grows by less than half a shard (two ~50 MiB shards).

    The earlier merge held a shard two to three times (memory map, tensors, serialised bytes: +109 MiB
    here); the streamed one holds a few matrices (+11 MiB here, of which most is export's fixed cost).
    Measured in a fresh process with Linux's VmHWM, reset just before the export.
    """
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    from transformers import AutoModelForCausalLM, LlamaConfig

    from converter.convert import convert
    from converter.options import ConvertOptions

    config = LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=32, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=1024, max_position_embeddings=64)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path / "src",
                                                                                 max_shard_size="64MB")
    bundle = tmp_path / "bundle"
    convert(tmp_path / "src", bundle, ConvertOptions(rank=4, targets=("q_proj", "down_proj"), niter=2),
            progress=False)
    shard_bytes = [p.stat().st_size for p in bundle.glob("model-*.safetensors")]
    assert len(shard_bytes) == 2 and min(shard_bytes) > 40e6
    biggest_tensor = 1024 * 256 * 4  # embed_tokens, lm_head (1 MiB); MLP matrices 0.75 MiB
    assert biggest_tensor < min(shard_bytes) / 40

    trained = tmp_path / "trained"
    shutil.copytree(bundle / "pissa_init", trained)
    weights = load_file(str(trained / "adapter_model.safetensors"))
    save_file({k: v + 0.01 for k, v in weights.items()}, str(trained / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    write_training_record(trained, bundle=open_bundle(bundle), init="pissa", step=1)

    run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(trained), str(tmp_path / "merged")],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    grown = figures["peak"] - figures["before"]
    print(f"\nmerge peak RSS growth {grown / 2**20:.1f} MiB; shards {[round(b / 2**20, 1) for b in shard_bytes]} MiB")
    assert sorted(p.name for p in (tmp_path / "merged").glob("*.safetensors")) == sorted(
        p.name for p in bundle.glob("*.safetensors"))
    assert grown < min(shard_bytes) / 2
