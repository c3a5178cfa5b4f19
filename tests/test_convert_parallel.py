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
from procs import free_port

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


# --- a rank fails: every rank stops, nothing half-done is left -----------------------------------
NAN_KEY = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture
def nan_on_rank_1(tiny_llama_sharded: Path, tmp_path: Path) -> Path:
    """A copy of the sharded model with a NaN in NAN_KEY, whose shard falls to rank 1 of 2."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = tmp_path / "nan-src"
    shutil.copytree(tiny_llama_sharded, src)
    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert shards.index(weight_map[NAN_KEY]) % 2 == 1, "the NaN must be in a shard rank 1 converts"
    shard = src / weight_map[NAN_KEY]
    sd = load_file(shard)
    sd[NAN_KEY][3, 5] = float("nan")
    save_file(sd, shard, metadata={"format": "pt"})
    return src


def _convert_args(source: Path, out: Path) -> list[str]:
    return ["-m", "pissa", "convert", str(source), str(out), "--quiet", "--rank", str(OPTIONS["rank"]),
            "--alpha", str(OPTIONS["alpha"]), "--niter", str(OPTIONS["niter"]),
            "--oversample", str(OPTIONS["oversample"]), "--seed", str(OPTIONS["seed"])]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PISSA_DEBUG": ""}


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def _two_nodes(args: list[str], cwd: Path, timeout: float) -> list[subprocess.CompletedProcess]:
    """``torchrun --nnodes 2 --nproc-per-node 1 --node-rank k`` twice: two elastic agents, as on two
    machines (rank k runs under agent k), so no agent can stop the other's rank: the ranks must."""
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--node-rank", str(k), "--master-addr", "127.0.0.1", "--master-port", str(port), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=cwd,
        )
        for k in (0, 1)
    ]
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)  # raises TimeoutExpired: the old code hung
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_nan_on_rank_1_stops_both_ranks_and_leaves_nothing(nan_on_rank_1: Path, tmp_path: Path):
    """``torchrun --standalone --nproc_per_node 2``, NaN in a shard of rank 1: both ranks exit
    non-zero well within the subprocess timeout (a bare barrier would leave rank 0 waiting up to 30
    minutes, or torchrun kills it mid-step), one error line names the tensor, and neither OUT nor
    its staging folder is left."""
    out = tmp_path / "out"
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--log-dir", str(logs), "--redirects", "3", *_convert_args(nan_on_rank_1, out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env(), cwd=tmp_path)
    rank_logs = {int(p.parent.name): p.read_text() for p in logs.rglob("stderr.log")}
    assert proc.returncode != 0
    assert sorted(rank_logs) == [0, 1]
    # torchrun's summary: both ranks failed (rank 0 exits 1 after rank 1 has reported, or is then
    # stopped by torchrun), none succeeded.
    codes = {int(r): int(c) for r, c in re.findall(r"rank\s*: (\d+) \(local_rank.*\n\s*exitcode\s*: (-?\d+)", proc.stderr)}
    assert sorted(codes) == [0, 1] and all(codes.values()), proc.stderr[-3000:]
    errors = {rank: _error_lines(text) for rank, text in rank_logs.items()}
    assert errors[0] == [], errors  # only the failing rank prints, once
    assert len(errors[1]) == 1 and NAN_KEY in errors[1][0] and "NaN or Inf" in errors[1][0], errors
    assert not out.exists()
    assert not (tmp_path / ".out.partial").exists(), list((tmp_path / ".out.partial").rglob("*"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_node_torchrun_nan_on_rank_1_stops_rank_0(nan_on_rank_1: Path, tmp_path: Path):
    """The same across two agents ("nodes"): rank 0 learns of rank 1's failure from the ranks' own
    agreement (no agent kills it), exits non-zero without a second error line, and after every rank
    has stopped writing rank 0 removes the staging folder."""
    out = tmp_path / "out"
    node0, node1 = _two_nodes(_convert_args(nan_on_rank_1, out), tmp_path, timeout=120)
    assert node0.returncode != 0 and node1.returncode != 0
    assert _error_lines(node0.stderr) == [], node0.stderr[-3000:]
    errors = _error_lines(node1.stderr)
    assert len(errors) == 1 and NAN_KEY in errors[0], node1.stderr[-3000:]
    assert not out.exists()
    assert not (tmp_path / ".out.partial").exists()


KILL_RANK_1 = """
import os, signal, sys
import converter.shard as c
real = c.convert_shard
def convert_then_die(*args, **kwargs):
    record = real(*args, **kwargs)
    if os.environ.get("RANK") == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return record
c.convert_shard = convert_then_die
from pissa.cli import main
sys.argv = ["pissa"] + sys.argv[1:]
main()
"""


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_node_torchrun_rank_1_killed(tiny_llama_sharded: Path, single_bundle: Path, tmp_path: Path):
    """Rank 1 is SIGKILLed after its first shard (its agent is on another "node", so only the ranks
    themselves can notice): rank 0 stops and exits non-zero with one line saying it lost a rank;
    the finished shards stay in staging and ``--resume`` (one process) completes the same bundle.

    On one node, torchrun's agent sends SIGTERM to the other ranks as soon as one dies, which gives
    the same end state (non-zero exits, staging kept for --resume)."""
    out = tmp_path / "out"
    script = tmp_path / "kill_rank_1.py"
    script.write_text(KILL_RANK_1)
    args = _convert_args(tiny_llama_sharded, out)[2:]
    node0, node1 = _two_nodes([str(script), *args], tmp_path, timeout=120)
    assert node1.returncode != 0 and "SIGKILL" in node1.stderr, node1.stderr[-3000:]
    assert node0.returncode != 0
    errors = _error_lines(node0.stderr)
    assert len(errors) == 1 and "lost another rank" in errors[0] and "--resume" in errors[0], node0.stderr[-3000:]
    assert not out.exists()
    assert list((tmp_path / ".out.partial" / ".parts").glob("*.json")), "finished shards were not kept"
    resumed = subprocess.run([sys.executable, "-m", "pissa", *args, "--resume"], capture_output=True, text=True,
                             timeout=240, env=_env(), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_bundle(out, single_bundle)
