"""Bad input: each case gives a clear one-line error, a non-zero exit, and no bundle at OUT.

Interrupted work (write failure, SIGKILL) resumes with ``--resume`` into a bundle whose files are
bit-identical to an uninterrupted run's (pissa.json differs only in its timings).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from converter.convert import convert, staging_path
from converter.options import ConvertOptions
from pissa.cli import run


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(src, dst)
    return dst


def _cli_error(capsys, args: list[str]) -> tuple[int, list[str]]:
    code = run(args)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, err


def _assert_one_line_error(code: int, err: list[str], *needles: str) -> None:
    assert code != 0
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    for needle in needles:
        assert needle in err[0], err[0]


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("model-*.safetensors"))


def test_missing_shard(tiny_llama_sharded, tmp_path, capsys):
    src = _copy(tiny_llama_sharded, tmp_path)
    _shards(src)[2].unlink()
    out = tmp_path / "out"
    code, err = _cli_error(capsys, ["convert", "-q", str(src), str(out)])
    _assert_one_line_error(code, err, "missing", "model-00003-of-00006.safetensors")
    assert not out.exists() and not staging_path(out).exists()


def test_index_names_missing_file(tiny_llama_sharded, tmp_path, capsys):
    src = _copy(tiny_llama_sharded, tmp_path)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "model-00099-of-00099.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    code, err = _cli_error(capsys, ["convert", "-q", str(src), str(tmp_path / "out")])
    _assert_one_line_error(code, err, "model-00099-of-00099.safetensors")
    assert not (tmp_path / "out").exists()


def test_corrupt_header(tiny_llama_sharded, tmp_path, capsys):
    src = _copy(tiny_llama_sharded, tmp_path)
    shard = _shards(src)[1]
    data = bytearray(shard.read_bytes())
    data[8:20] = b"garbage!!!!!"
    shard.write_bytes(bytes(data))
    code, err = _cli_error(capsys, ["convert", "-q", str(src), str(tmp_path / "out")])
    _assert_one_line_error(code, err, shard.name, "corrupt")
    assert not (tmp_path / "out").exists()


def test_truncated_shard(tiny_llama_sharded, tmp_path, capsys):
    src = _copy(tiny_llama_sharded, tmp_path)
    shard = _shards(src)[3]
    shard.write_bytes(shard.read_bytes()[:-1000])
    code, err = _cli_error(capsys, ["convert", "-q", str(src), str(tmp_path / "out")])
    _assert_one_line_error(code, err, shard.name, "truncated")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight(tiny_llama_sharded, tmp_path, capsys, bad):
    src = _copy(tiny_llama_sharded, tmp_path)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    key = "model.layers.1.mlp.down_proj.weight"
    shard = src / index["weight_map"][key]
    sd = load_file(shard)
    sd[key][3, 5] = bad
    save_file(sd, shard, metadata={"format": "pt"})
    out = tmp_path / "out"
    code, err = _cli_error(capsys, ["convert", "-q", str(src), str(out)])
    _assert_one_line_error(code, err, key, "NaN or Inf")
    assert not out.exists() and not staging_path(out).exists()


def test_rank_too_large_is_one_line_for_all_matrices(tiny_llama, tmp_path, capsys):
    # k_proj/v_proj are [64, 128]: rank 100 fits q/o/gate/up/down's min dims (128) but not theirs. One line names
    # the smallest and counts the rest (it was one line per matrix: 210 for SmolLM2).
    code, err = _cli_error(capsys, ["convert", "-q", str(tiny_llama), str(tmp_path / "out"), "--rank", "100"])
    _assert_one_line_error(code, err, "exceeds min(out, in) = 64", "and 3 other target(s)", "--targets")
    assert not (tmp_path / "out").exists()


def test_unknown_target_lists_what_exists(tiny_llama, tmp_path, capsys):
    code, err = _cli_error(capsys, ["convert", "-q", str(tiny_llama), str(tmp_path / "out"), "--targets", "q_proj,qq_proj"])
    _assert_one_line_error(code, err, "'qq_proj'", "q_proj, up_proj, v_proj")
    assert not (tmp_path / "out").exists()


def test_non_float_dtype_option(tiny_llama, tmp_path, capsys):
    code, err = _cli_error(capsys, ["convert", "-q", str(tiny_llama), str(tmp_path / "out"), "--dtype", "int8"])
    _assert_one_line_error(code, err, "--dtype", "int8")


def test_non_float_target_weight(tiny_llama, tmp_path, capsys):
    src = _copy(tiny_llama, tmp_path)
    sd = load_file(src / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    sd[key] = (sd[key] * 100).to(torch.int8)
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    code, err = _cli_error(capsys, ["convert", "-q", str(src), str(tmp_path / "out")])
    _assert_one_line_error(code, err, key, "I8", "not a float")


def test_all_option_problems_reported_at_once(tiny_llama, tmp_path, capsys):
    code, err = _cli_error(
        capsys, ["convert", "-q", str(tiny_llama), str(tmp_path / "out"), "--rank", "0", "--workers", "0", "--dtype", "x"]
    )
    assert code == 2
    assert len(err) == 4  # three problems and the summary line
    assert any("--rank" in e for e in err) and any("--workers" in e for e in err) and any("--dtype" in e for e in err)


@pytest.mark.parametrize("alpha", ["nan", "inf"])
def test_alpha_must_be_finite(tiny_llama, tmp_path, capsys, alpha):
    # --alpha nan wrote NaN adapters with "max reconstruction error 0.00e+00"; inf wrote zero adapters (a review,
    # 2026-12-08).
    code, err = _cli_error(capsys, ["convert", "-q", str(tiny_llama), str(tmp_path / "out"), "--alpha", alpha])
    assert code == 2 and any(f"--alpha must be a finite number > 0, got {alpha}" in e for e in err), err
    assert not (tmp_path / "out").exists()


def test_out_not_empty(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _cli_error(capsys, ["convert", "-q", str(tiny_llama), str(out)])
    _assert_one_line_error(code, err, "not empty", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    assert run(["convert", "-q", str(tiny_llama), str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "pissa.json").exists()


def test_missing_source(tmp_path, capsys):
    code, err = _cli_error(capsys, ["convert", "-q", str(tmp_path / "nope"), str(tmp_path / "out")])
    _assert_one_line_error(code, err, "does not exist")


def test_pickle_only_needs_opt_in(tiny_llama, tmp_path, capsys):
    src = tmp_path / "bin"
    src.mkdir()
    for f in tiny_llama.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, src / f.name)
    torch.save(load_file(tiny_llama / "model.safetensors"), src / "pytorch_model.bin")
    code, err = _cli_error(capsys, ["convert", "-q", str(src), str(tmp_path / "out")])
    _assert_one_line_error(code, err, "pickle", "--allow-pickle")
    assert run(["convert", "-q", str(src), str(tmp_path / "out"), "--allow-pickle"]) == 0
    assert (tmp_path / "out" / "model.safetensors").exists()


def _bundle_files(bundle: Path) -> dict[str, bytes]:
    return {
        p.relative_to(bundle).as_posix(): p.read_bytes()
        for p in sorted(bundle.rglob("*"))
        if p.is_file() and p.name != "pissa.json"
    }


def _record_without_timings(bundle: Path) -> dict:
    record = json.loads((bundle / "pissa.json").read_text())
    record.pop("timings")
    return record


@pytest.fixture(scope="module")
def reference_bundle(tiny_llama_sharded, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "bundle"
    convert(tiny_llama_sharded, out, ConvertOptions(rank=8), progress=False)
    return out


def test_disk_write_failure_then_resume(tiny_llama_sharded, reference_bundle, tmp_path, capsys, monkeypatch):
    from converter import stio

    calls = {"n": 0}
    real_write = stio.SafetensorsWriter.write

    def failing_write(self, key, tensor):
        calls["n"] += 1
        if calls["n"] == 40:  # well into the conversion
            raise OSError(28, "No space left on device")
        return real_write(self, key, tensor)

    monkeypatch.setattr(stio.SafetensorsWriter, "write", failing_write)
    out = tmp_path / "out"
    code, err = _cli_error(capsys, ["convert", "-q", str(tiny_llama_sharded), str(out), "--rank", "8"])
    _assert_one_line_error(code, err, "No space left on device", "--resume")
    assert not out.exists()
    assert not list(staging_path(out).rglob(".*.tmp")), "temporary files left behind"
    monkeypatch.setattr(stio.SafetensorsWriter, "write", real_write)

    assert run(["convert", "-q", str(tiny_llama_sharded), str(out), "--rank", "8", "--resume"]) == 0
    assert _bundle_files(out) == _bundle_files(reference_bundle)
    assert _record_without_timings(out)["files"] == _record_without_timings(reference_bundle)["files"]
    assert not staging_path(out).exists()


KILLER = """
import os, signal, sys
import converter.shard as c
real = c.convert_shard
done = {"n": 0}
def convert_then_die(*args, **kwargs):
    record = real(*args, **kwargs)
    done["n"] += 1
    if done["n"] == int(os.environ["DIE_AFTER"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return record
c.convert_shard = convert_then_die
from pissa.cli import main
sys.argv = ["pissa"] + sys.argv[1:]
main()
"""


def test_killed_midway_then_resume_is_bit_identical(tiny_llama_sharded, reference_bundle, tmp_path):
    out = tmp_path / "out"
    args = ["convert", "-q", str(tiny_llama_sharded), str(out), "--rank", "8"]
    env = {**os.environ, "DIE_AFTER": "3"}
    proc = subprocess.run([sys.executable, "-c", KILLER, *args], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    # Two shards are in flight at once, so the other one may just have finished too.
    finished = len(list((staging_path(out) / ".parts").glob("*.json")))
    assert finished in (3, 4)

    resumed = subprocess.run(
        [sys.executable, "-m", "pissa", *args, "--resume"], capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"({finished})" in resumed.stdout  # the finished shards are reused
    assert _bundle_files(out) == _bundle_files(reference_bundle)
    assert _record_without_timings(out) == {
        **_record_without_timings(reference_bundle),
        "source": _record_without_timings(out)["source"],
    }


def test_resume_redoes_a_damaged_part(tiny_llama_sharded, reference_bundle, tmp_path):
    """A part whose file no longer matches its marker's checksum is converted again, not trusted."""
    out = tmp_path / "out"
    env = {**os.environ, "DIE_AFTER": "2"}
    args = ["convert", "-q", str(tiny_llama_sharded), str(out), "--rank", "8"]
    subprocess.run([sys.executable, "-c", KILLER, *args], env=env, capture_output=True, timeout=300)
    # Two shards are in flight at once, so a third may have finished before the kill too.
    markers = sorted((staging_path(out) / ".parts").glob("model-*.safetensors.json"))
    assert len(markers) in (2, 3)
    part = staging_path(out) / markers[0].name.removesuffix(".json")
    data = bytearray(part.read_bytes())
    data[-1] ^= 0xFF
    part.write_bytes(bytes(data))
    proc = subprocess.run([sys.executable, "-m", "pissa", *args, "--resume"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"({len(markers) - 1})" in proc.stdout  # only the intact parts were reused
    assert _bundle_files(out) == _bundle_files(reference_bundle)


def test_cuda_without_a_gpu_is_one_line(tiny_llama, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a machine with a GPU
    code, err = _cli_error(capsys, ["convert", "-q", str(tiny_llama), str(tmp_path / "out"), "--device", "cuda"])
    _assert_one_line_error(code, err, "--device cuda: no CUDA device", "--device cpu")
    assert not (tmp_path / "out").exists()


def test_resume_of_a_finished_bundle_with_other_options_is_refused(tiny_llama, tmp_path, capsys):
    # Before: "already complete", exit 0, and the bundle stayed rank 4 (a review, 2026-12-08).
    out = tmp_path / "out"
    assert run(["convert", "-q", str(tiny_llama), str(out), "--rank", "4"]) == 0
    record = (out / "pissa.json").read_text()
    code, err = _cli_error(capsys, ["convert", "-q", str(tiny_llama), str(out), "--rank", "8", "--resume"])
    assert code == 2 and any("rank was 4, now 8" in e for e in err) and "--overwrite" in err[-1], err
    assert (out / "pissa.json").read_text() == record
    assert run(["convert", "-q", str(tiny_llama), str(out), "--rank", "4", "--resume"]) == 0  # same options: a no-op


def test_a_bundle_as_source_is_refused(tiny_llama, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    assert run(["convert", "-q", str(tiny_llama), str(bundle), "--rank", "4"]) == 0
    code, err = _cli_error(capsys, ["convert", "-q", str(bundle), str(tmp_path / "again")])
    _assert_one_line_error(code, err, "is a PiSSA bundle", "convert the original model")
    assert not (tmp_path / "again").exists()
