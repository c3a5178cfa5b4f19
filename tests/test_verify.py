"""``pissa verify``: passes on a fresh bundle, and catches each kind of damage with its own line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from converter.convert import convert
from converter.options import ConvertOptions
from converter.verify import verify_bundle
from pissa.cli import run
from pissa.core.errors import VerificationError
from pissa.core.hashing import sha256_file


@pytest.fixture(scope="module")
def bundle_bf16(tiny_llama_sharded, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("verify") / "bundle"
    convert(tiny_llama_sharded, out, ConvertOptions(rank=8, dtype="bfloat16"), progress=False)
    return out


@pytest.fixture
def bundle(bundle_bf16, tmp_path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_bf16, copy)
    return copy


def _rehash(bundle: Path, rel: str) -> None:
    """Make pissa.json agree with a modified file, so only the deeper checks can catch it."""
    record = json.loads((bundle / "pissa.json").read_text())
    record["files"][rel] = sha256_file(bundle / rel)
    (bundle / "pissa.json").write_text(json.dumps(record))


def test_fresh_bundle_verifies_against_source(bundle, tiny_llama_sharded, capsys):
    report = verify_bundle(bundle, source=str(tiny_llama_sharded))
    assert report.matrices == 14
    # bf16 residual: relative error of W_res + s·BA is the bf16 rounding of W_res (2^-9 per element at most).
    assert 1e-4 < report.max_rel_error < 4e-3
    assert run(["verify", str(bundle), "--source", str(tiny_llama_sharded)]) == 0
    assert capsys.readouterr().out.startswith("ok: ")


def test_modified_file_fails_checksum(bundle, capsys):
    (bundle / "tokenizer.json").write_text("{}")
    code = run(["verify", str(bundle)])
    err = capsys.readouterr().err.splitlines()
    assert code == 1
    assert err == [
        "error: tokenizer.json: checksum differs from pissa.json (modified or corrupt) — "
        "re-convert the bundle (pissa convert --overwrite)"
    ]


def test_missing_file_and_bad_config_reported_together(bundle):
    (bundle / "generation_config.json").unlink()
    cfg_path = bundle / "pissa_init" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["r"] = 4
    cfg_path.write_text(json.dumps(cfg))
    _rehash(bundle, "pissa_init/adapter_config.json")
    with pytest.raises(VerificationError) as err:
        verify_bundle(bundle)
    problems = err.value.problems()
    assert any("generation_config.json: missing" in p for p in problems)
    assert any("adapter_config r=4" in p for p in problems)


def test_adapter_that_disagrees_with_records(bundle):
    path = bundle / "pissa_init" / "adapter_model.safetensors"
    sd = load_file(path)
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    sd[key] = sd[key] * 3
    save_file(sd, path, metadata={"format": "pt"})
    _rehash(bundle, "pissa_init/adapter_model.safetensors")
    with pytest.raises(VerificationError) as err:
        verify_bundle(bundle)
    assert [p for p in err.value.problems() if "up_proj" in p and "energy" in p]


def test_wrong_source_fails_reconstruction(bundle, tiny_llama_sharded, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_llama_sharded, other)
    index = json.loads((other / "model.safetensors.index.json").read_text())
    key = "model.layers.0.self_attn.o_proj.weight"
    shard = other / index["weight_map"][key]
    sd = load_file(shard)
    sd[key] = sd[key] + 0.05 * torch.randn_like(sd[key])
    save_file(sd, shard, metadata={"format": "pt"})
    with pytest.raises(VerificationError) as err:
        verify_bundle(bundle, source=str(other))
    problems = err.value.problems()
    assert len(problems) == 1 and "o_proj" in problems[0] and "exceeds" in problems[0]


def test_not_a_bundle(tmp_path, capsys):
    assert run(["verify", str(tmp_path)]) == 1
    assert "pissa.json is missing" in capsys.readouterr().err


# --- a tampered pissa.json, and the wrong source (a review, 2026-12-08: these verified "ok" or were internal errors)
def _edit_record(bundle: Path, edit) -> None:
    record = json.loads((bundle / "pissa.json").read_text())
    edit(record)
    (bundle / "pissa.json").write_text(json.dumps(record))


@pytest.mark.parametrize("edit, fragment", [
    (lambda r: r["files"].pop(next(k for k in r["files"] if k.endswith(".safetensors") and "/" not in k)),
     "not recorded in pissa.json"),
    (lambda r: r.update(files={}), "files must map every file"),
    (lambda r: r.update(matrices=[]), "matrices must list every converted matrix"),
    (lambda r: r.update(format_version=99), "format_version is 99"),
    (lambda r: r.pop("adapter"), "adapter must be an object"),
    (lambda r: r.update(adapter="x"), "adapter must be an object"),
    (lambda r: r.update(matrices=r["matrices"][1:]), "adapter tensor of a matrix pissa.json does not record"),
    (lambda r: r["matrices"][0].update(shape="x"), "shape: two integers"),
    (lambda r: r["matrices"][0].update(energy="x"), "energy a number"),
], ids=["unrecorded-weights", "no-files", "no-matrices", "version", "no-adapter", "adapter-string", "one-matrix-less",
        "shape-string", "energy-string"])
def test_an_edited_record_does_not_verify(bundle, edit, fragment, capsys):
    _edit_record(bundle, edit)
    assert run(["verify", str(bundle)]) == 1
    err = capsys.readouterr().err
    assert fragment in err and "internal error" not in err, err


def test_another_model_as_source_is_one_line(bundle, tiny_qwen2, capsys):
    assert run(["verify", str(bundle), "--source", str(tiny_qwen2)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "is not the source" in err[0] and "differ from pissa.json's source.files" in err[0], err


def test_missing_adapter_folder_is_reported_once_per_file(bundle, capsys):
    shutil.rmtree(bundle / "pissa_init")
    assert run(["verify", str(bundle)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err[:2] == ["error: pissa_init/adapter_config.json: missing", "error: pissa_init/adapter_model.safetensors: missing"]
    assert len(err) == 3, err  # and the summary; "unreadable" was a third line for the same missing file
