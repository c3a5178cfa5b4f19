"""Parallel and distributed conversion give the single-process bundle, bit for bit.

"Same bundle" means: the same relative file names; identical bytes for every file (residual shards,
index, adapter, adapter config, copied config/tokenizer files, model card); and pissa.json equal
except its ``timings`` field (wall times and the execution settings: workers/threads/device).

Why the tensors are bit-identical rather than merely close: every matrix is factored with ONE BLAS
thread (``converter.shard.single_threaded_blas``; parallelism is across matrices and shards instead),
and every randomized sketch is seeded from the run seed and the tensor key alone
(``converter.shard.matrix_seed``), so a matrix's result does not depend on which process, thread or
rank computed it, nor on the number of them. A difference here would mean a conversion depends on
its scheduling, which is a bug.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from converter.convert import convert
from converter.options import ConvertOptions

# Default randomized SVD (seeded sketches are what could go wrong across processes) at a rank the
# tiny model allows; rank + oversample < min(out, in) = 128, so the randomized path really runs.
OPTIONS = dict(rank=8, alpha=16, niter=4, oversample=8, seed=5)


def bundle_files(bundle: Path) -> dict[str, bytes]:
    return {p.relative_to(bundle).as_posix(): p.read_bytes() for p in sorted(bundle.rglob("*")) if p.is_file()}


def assert_same_bundle(got: Path, expected: Path) -> None:
    """Same file names, identical bytes, pissa.json equal except ``timings``."""
    a, b = bundle_files(got), bundle_files(expected)
    assert sorted(a) == sorted(b), "different files"
    assert any(n.startswith("model-") and n.endswith(".safetensors") for n in a), "not a sharded bundle"
    different = [n for n in a if n != "pissa.json" and a[n] != b[n]]
    assert not different, f"files differ from the single-process bundle: {different}"
    rec_a, rec_b = json.loads(a["pissa.json"]), json.loads(b["pissa.json"])
    assert "timings" in rec_a and "timings" in rec_b
    rec_a.pop("timings")
    rec_b.pop("timings")
    assert rec_a == rec_b


@pytest.fixture(scope="module")
def single_bundle(tiny_llama_sharded: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("parallel") / "single"
    report = convert(tiny_llama_sharded, out, ConvertOptions(workers=1, **OPTIONS), progress=False)
    assert report.shards_total >= 4 and report.matrices == 14
    return out


def test_source_is_multi_shard(tiny_llama_sharded: Path):
    index = json.loads((tiny_llama_sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 4


def test_workers_2_gives_the_same_bundle(tiny_llama_sharded: Path, single_bundle: Path, tmp_path: Path):
    out = tmp_path / "workers2"
    report = convert(tiny_llama_sharded, out, ConvertOptions(workers=2, **OPTIONS), progress=False)
    assert report.record["timings"]["execution"]["workers"] == 2
    assert_same_bundle(out, single_bundle)


def test_threads_do_not_change_the_bundle(tiny_llama_sharded: Path, single_bundle: Path, tmp_path: Path):
    """One thread vs several threads per process: matrices are independent, so bytes are equal."""
    out = tmp_path / "threads1"
    convert(tiny_llama_sharded, out, ConvertOptions(threads=1, **OPTIONS), progress=False)
    assert_same_bundle(out, single_bundle)


def test_a_changed_option_changes_the_bundle(tiny_llama_sharded: Path, single_bundle: Path, tmp_path: Path):
    """The comparison is sharp: another seed gives other adapter bytes (and only those tensors move)."""
    out = tmp_path / "seed6"
    convert(tiny_llama_sharded, out, ConvertOptions(**{**OPTIONS, "seed": 6}), progress=False)
    with pytest.raises(AssertionError):
        assert_same_bundle(out, single_bundle)
    assert bundle_files(out)["config.json"] == bundle_files(single_bundle)["config.json"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_two_ranks_give_the_same_bundle(tiny_llama_sharded: Path, single_bundle: Path, tmp_path: Path):
    """``torchrun --nproc_per_node 2 -m pissa convert``: gloo on CPU, each rank takes half the shards."""
    out = tmp_path / "torchrun"
    logs = tmp_path / "logs"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "--log-dir", str(logs), "--redirects", "3",
        "-m", "pissa", "-vv", "convert", str(tiny_llama_sharded), str(out), "--quiet",
        "--rank", str(OPTIONS["rank"]), "--alpha", str(OPTIONS["alpha"]), "--niter", str(OPTIONS["niter"]),
        "--oversample", str(OPTIONS["oversample"]), "--seed", str(OPTIONS["seed"]),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    rank_logs = {
        int(p.parent.name): p.read_text() + (p.parent / "stdout.log").read_text()
        for p in logs.rglob("stderr.log")
    }
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stderr[-3000:]}\n{rank_logs}"
    assert not (tmp_path / ".torchrun.partial").exists()
    # Each rank converted its own share of the shards (shard i on rank i % 2) and printed the summary.
    shards = sorted(set(json.loads((tiny_llama_sharded / "model.safetensors.index.json").read_text())
                        ["weight_map"].values()))
    assert sorted(rank_logs) == [0, 1]
    for rank, text in rank_logs.items():
        done = sorted(re.findall(r"shard (\S+\.safetensors): \d+ matrices", text))
        assert done == [s for i, s in enumerate(shards) if i % 2 == rank], (rank, text[-2000:])
        assert "energy share" in text, text[-2000:]
    assert_same_bundle(out, single_bundle)


@pytest.mark.parametrize("workers", [1, 2])
def test_source_checksums_are_the_files_sha256(tiny_llama_sharded: Path, tmp_path: Path, workers: int) -> None:
    """pissa.json's source sha256s: one process hashes its shards in a background thread from the
    start; worker processes hash the bytes they read for conversion when the tensors tile a shard,
    and make a separate pass when they do not (here: trailing bytes after the last tensor). All
    must equal the file's sha256."""
    import shutil

    from pissa.core.hashing import sha256_file

    src = tmp_path / "src"
    shutil.copytree(tiny_llama_sharded, src)
    shards = sorted(src.glob("model-*.safetensors"))
    with open(shards[1], "ab") as f:
        f.write(b"\0" * 24)  # not covered by any tensor: the streamed hash would miss these bytes
    out = tmp_path / "out"
    convert(src, out, ConvertOptions(**OPTIONS, workers=workers), progress=False)
    recorded = json.loads((out / "pissa.json").read_text())["source"]["files"]
    expected = {p.name: sha256_file(p) for p in src.iterdir() if p.is_file()}
    assert recorded == expected
