"""``pissa zoo`` end to end on tiny models: isolated failures, resume after a kill, torchrun ranks, push.

The manifests are written by the tests and point at the session's tiny checkpoints (conftest.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from converter.zoo import run_zoo
from pissa.cli import run

REPO_ROOT = Path(__file__).resolve().parent.parent


def _files(folder: Path) -> dict[str, str]:
    """sha256 of every file of a bundle; pissa.json without its timings (wall-clock times)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(folder).as_posix()
        if rel == "pissa.json":
            record = json.loads(p.read_text())
            record.pop("timings", None)
            out[rel] = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _bundles(root: Path) -> dict[str, dict[str, str]]:
    return {p.parent.relative_to(root).as_posix(): _files(p.parent) for p in sorted(root.glob("*/r*/pissa.json"))}


def _report(root: Path) -> dict[tuple[str, int], dict]:
    data = json.loads((root / "zoo-report.json").read_text())
    return {(r["entry"], r["rank"]): r for r in data["results"]}


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture(scope="module")
def three_model_zoo(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, tiny_llama_sharded: Path,
                    tiny_gpt2: Path) -> tuple[Path, Path]:
    """A 3-entry, 4-job manifest and the bundles of one uninterrupted single-process run of it."""
    base = tmp_path_factory.mktemp("zoo-reference")
    manifest = _write(base / "zoo.yaml", f"""\
        defaults:
          svd: randomized
          niter: 2
        entries:
          - name: llama
            source: {tiny_llama}
            ranks: [4]
          - name: llama-sharded
            source: {tiny_llama_sharded}
            ranks: [4, 8]
          - name: gpt2
            source: {tiny_gpt2}
            ranks: 4
            svd: exact
        """)
    report = run_zoo(manifest, out=base / "ref", progress=False)
    assert report.ok, report.failed
    return manifest, base / "ref"


def test_broken_middle_entry_is_isolated_then_fixed(tmp_path: Path, tiny_llama: Path, tiny_llama_sharded: Path,
                                                     capsys) -> None:
    corrupt = Path(shutil.copytree(tiny_llama_sharded, tmp_path / "corrupt"))
    shard = corrupt / "model-00003-of-00006.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated mid-tensor
    text = """\
        entries:
          - name: first
            source: {first}
            ranks: [4]
          - name: middle
            source: {middle}
            ranks: [4]
          - name: last
            source: {last}
            ranks: [8]
        """
    manifest = _write(tmp_path / "zoo.yaml", text.format(first=tiny_llama, middle=corrupt, last=tiny_llama))
    root = tmp_path / "out"

    code = run(["zoo", str(manifest), "--out", str(root), "-q"])
    captured = capsys.readouterr()
    assert code == 1
    report = _report(root)
    assert [(k, r["status"]) for k, r in report.items()] == [
        (("first", 4), "converted"), (("middle", 4), "failed"), (("last", 8), "converted"),
    ]
    assert "model-00003-of-00006.safetensors" in report[("middle", 4)]["error"]
    assert "error: middle r4:" in captured.err and "model-00003-of-00006.safetensors" in captured.err
    assert "middle" in captured.out and "failed" in captured.out  # the summary table
    md = (root / "zoo-report.md").read_text()
    assert "| middle | 4 | failed |" in md and "## Failures" in md
    assert not (root / "middle" / "r4").exists()  # nothing half-written at the bundle's path
    done = {name: _files(root / name / f"r{r}") for name, r in (("first", 4), ("last", 8))}
    mtimes = {p: p.stat().st_mtime_ns for p in root.glob("*/r*/**/*") if p.is_file() and "middle" not in p.parts}

    # fix the manifest: the second run converts only the fixed entry
    _write(manifest, text.format(first=tiny_llama, middle=tiny_llama_sharded, last=tiny_llama))
    assert run(["zoo", str(manifest), "--out", str(root), "-q"]) == 0
    report = _report(root)
    assert [r["status"] for r in report.values()] == ["skipped", "converted", "skipped"]
    assert {name: _files(root / name / f"r{r}") for name, r in (("first", 4), ("last", 8))} == done
    assert len(mtimes) > 10
    for p, t in mtimes.items():
        assert p.stat().st_mtime_ns == t, f"{p} was rewritten"


def test_changed_options_or_damaged_bundle_are_redone(tmp_path: Path, tiny_llama: Path) -> None:
    manifest = _write(tmp_path / "zoo.yaml", f"entries:\n  - {{name: m, source: {tiny_llama}, ranks: 4}}\n")
    root = tmp_path / "out"
    assert run_zoo(manifest, out=root, progress=False).results[0].status == "converted"
    adapter = root / "m" / "r4" / "pissa_init" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-8] + b"\0" * 8)
    assert run_zoo(manifest, out=root, progress=False).results[0].status == "converted"
    _write(manifest, f"entries:\n  - {{name: m, source: {tiny_llama}, ranks: 4, seed: 7}}\n")
    result = run_zoo(manifest, out=root, progress=False).results[0]
    assert result.status == "converted" and json.loads((root / "m/r4/pissa.json").read_text())["options"]["seed"] == 7
    assert run_zoo(manifest, out=root, progress=False).results[0].status == "skipped"


def test_changed_svd_tol_is_redone(tmp_path: Path, tiny_llama: Path) -> None:
    """The reuse check compares every content option of the converter (svd_tol was once missing)."""
    manifest = _write(tmp_path / "zoo.yaml", f"entries:\n  - {{name: m, source: {tiny_llama}, ranks: 4}}\n")
    root = tmp_path / "out"
    assert run_zoo(manifest, out=root, progress=False).results[0].status == "converted"
    _write(manifest, f"entries:\n  - {{name: m, source: {tiny_llama}, ranks: 4, svd_tol: 0.25}}\n")
    result = run_zoo(manifest, out=root, progress=False).results[0]
    assert result.status == "converted"
    assert json.loads((root / "m/r4/pissa.json").read_text())["options"]["svd_tol"] == 0.25
    assert run_zoo(manifest, out=root, progress=False).results[0].status == "skipped"


def test_reuse_check_sees_every_content_option_and_no_other(tmp_path: Path, tiny_llama: Path) -> None:
    """A finished bundle is stale when any option of ``content_record`` differs, never for workers etc."""
    from dataclasses import replace

    from converter.options import ConvertOptions
    from converter.zoo import plan_jobs, reuse_problems
    from converter.zoo_manifest import load_zoo_manifest

    manifest = _write(tmp_path / "zoo.yaml", f"entries:\n  - {{name: m, source: {tiny_llama}, ranks: 4}}\n")
    root = tmp_path / "out"
    assert run_zoo(manifest, out=root, progress=False).ok
    job = plan_jobs(load_zoo_manifest(manifest), root)[0]
    bundle = Path(job.out)
    assert reuse_problems(bundle, job, str(tiny_llama)) == []
    changed = {"rank": 8, "rslora": True, "targets": ("q_proj",), "svd": "exact", "niter": 3, "oversample": 2,
               "svd_tol": 0.5, "seed": 1, "dtype": "float16", "adapter_dtype": "bfloat16", "revision": "v2",
               "quantize": "nf4", "quant_iters": 3, "quant_blocksize": 128, "double_quant": True}
    assert set(changed) | {"lora_alpha"} == set(ConvertOptions().content_record()), "cover every content option"
    for name, value in changed.items():
        problems = reuse_problems(bundle, replace(job, options=replace(job.options, **{name: value})), str(tiny_llama))
        assert any(p.startswith(f"option {name} ") for p in problems), (name, problems)
    alpha = reuse_problems(bundle, replace(job, options=replace(job.options, alpha=8.0)), str(tiny_llama))
    assert alpha == ["option lora_alpha was 4.0, now 8.0 in the manifest"]
    same = replace(job.options, alpha=4.0, workers=3, threads=2, device="cuda", allow_pickle=True)
    assert reuse_problems(bundle, replace(job, options=same), str(tiny_llama)) == []


def test_bad_rank_fails_alone_and_only_filters(tmp_path: Path, tiny_llama: Path) -> None:
    manifest = _write(tmp_path / "zoo.yaml", f"""\
        entries:
          - {{name: too-big, source: {tiny_llama}, ranks: [100000]}}
          - {{name: fine, source: {tiny_llama}, ranks: [4]}}
        """)
    report = run_zoo(manifest, out=tmp_path / "out", progress=False)
    assert [r.status for r in report.results] == ["failed", "converted"] and not report.ok
    assert "100000" in (report.results[0].error or "")
    only = run_zoo(manifest, out=tmp_path / "out", only=["fine"], progress=False)
    assert [(r.entry, r.status) for r in only.results] == [("fine", "skipped")] and only.ok
    assert run(["zoo", str(manifest), "--out", str(tmp_path / "out"), "--only", "nope"]) == 2


def test_concurrent_run_on_the_same_bundle_is_refused(tmp_path: Path, tiny_llama: Path) -> None:
    import fcntl

    manifest = _write(tmp_path / "zoo.yaml", f"entries:\n  - {{name: m, source: {tiny_llama}, ranks: 4}}\n")
    (tmp_path / "out" / "m").mkdir(parents=True)
    with open(tmp_path / "out" / "m" / ".r4.lock", "w") as held:  # another run converting m r4
        held.write("4242")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        busy = run_zoo(manifest, out=tmp_path / "out", progress=False).results[0]
    assert busy.status == "failed" and "being written by another process" in (busy.error or "")
    assert "pid 4242" in (busy.error or "") and not (tmp_path / "out" / "m" / "r4").exists()
    assert run_zoo(manifest, out=tmp_path / "out", progress=False).results[0].status == "converted"


KILLER = """\
import os, signal, sys
import converter.shard as C

calls = 0
real = C.convert_shard


def convert_shard(*args, **kwargs):
    global calls
    calls += 1
    if calls == int(os.environ["KILL_AT_SHARD"]):
        os.kill(os.getpid(), signal.SIGKILL)  # as abrupt as a node failure
    return real(*args, **kwargs)


C.convert_shard = convert_shard
from pissa.cli import run

sys.exit(run(sys.argv[1:]))
"""


def test_kill_mid_zoo_then_rerun_is_bit_identical(tmp_path: Path, three_model_zoo: tuple[Path, Path]) -> None:
    """SIGKILL in the 4th shard of the 2nd job (llama-sharded r4, 6 shards); a re-run finishes it."""
    manifest, reference = three_model_zoo
    root = tmp_path / "out"
    script = _write(tmp_path / "killer.py", KILLER)
    env = {**os.environ, "KILL_AT_SHARD": str(1 + 4), "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, str(script), "zoo", str(manifest), "--out", str(root), "-q"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (root / "llama" / "r4" / "pissa.json").exists()
    assert not (root / "llama-sharded" / "r4").exists() and not (root / "zoo-report.json").exists()
    partial = root / "llama-sharded" / ".r4.partial"
    # Shards 1-2 finished before the kill; a converter has two shards in flight, so the 3rd may have too.
    assert len(list(partial.glob(".parts/*.json"))) in (2, 3)

    report = run_zoo(manifest, out=root, progress=False)
    assert [(r.entry, r.rank, r.status) for r in report.results] == [
        ("llama", 4, "skipped"), ("llama-sharded", 4, "resumed"), ("llama-sharded", 8, "converted"),
        ("gpt2", 4, "converted"),
    ]
    assert _bundles(root) == _bundles(reference) and len(_bundles(root)) == 4
    assert not partial.exists()


@pytest.mark.slow
def test_two_torchrun_ranks_and_workers_match_one_process(tmp_path: Path,
                                                          three_model_zoo: tuple[Path, Path]) -> None:
    manifest, reference = three_model_zoo
    root = tmp_path / "torchrun"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "pissa", "zoo", str(manifest), "--out", str(root), "-q"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((root / "zoo-report.json").read_text())
    assert data["world_size"] == 2 and data["ok_jobs"] == 4
    assert sorted({r["rank_of_world"] for r in data["results"]}) == [0, 1]
    assert _bundles(root) == _bundles(reference)

    pooled = run_zoo(manifest, out=tmp_path / "workers", workers=2, progress=False)
    assert pooled.ok and _bundles(tmp_path / "workers") == _bundles(reference)


def test_zoo_push(hub, tmp_path: Path, tiny_llama: Path) -> None:
    """Hub in, Hub out: the source is a hub id (downloaded from the stand-in), bundles are pushed."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.endpoint, token="hf_alice")
    api.create_repo("alice/tl-source")
    api.upload_folder(repo_id="alice/tl-source", folder_path=str(tiny_llama))
    manifest = _write(tmp_path / "zoo.yaml", """\
        entries:
          - name: tl
            source: hub:alice/tl-source
            ranks: [4, 8]
            push: alice/{name}-pissa-r{rank}
            private: true
        """)
    first = run_zoo(manifest, out=tmp_path / "out", push=True, progress=False)
    assert [(r.repo_id, r.status, r.pushed) for r in first.results] == [
        ("alice/tl-pissa-r4", "converted", "uploaded"), ("alice/tl-pissa-r8", "converted", "uploaded"),
    ], first.failed
    assert json.loads((tmp_path / "out/tl/r4/pissa.json").read_text())["source"]["repo_id"] == "alice/tl-source"
    assert hub.repos["alice/tl-pissa-r8"].private
    again = run_zoo(manifest, out=tmp_path / "out", push=True, progress=False)
    assert [(r.status, r.pushed) for r in again.results] == [("skipped", "unchanged")] * 2
    hub.fail("POST", r"/api/repos/create", 500, times=1)
    (tmp_path / "out" / "tl" / "r4").rename(tmp_path / "moved")  # r4 converts again; its push fails
    failed = run_zoo(manifest, out=tmp_path / "out", push=True, progress=False)
    assert [(r.status, r.pushed) for r in failed.results] == [("converted", "failed"), ("skipped", "unchanged")]
    assert not failed.ok and "HTTP 500" in (failed.results[0].error or "")


@pytest.mark.slow
def test_shipped_zoo_local_runs_offline(tmp_path: Path, smollm2_gguf: Path) -> None:
    """manifests/zoo-local.yaml: the embedded SmolLM2 at ranks 8/16/32, no network (HF_HUB_OFFLINE=1)."""
    report = run_zoo(REPO_ROOT / "manifests" / "zoo-local.yaml", out=tmp_path, progress=False)
    assert report.ok, report.failed
    assert [(r.rank, r.status, r.matrices) for r in report.results] == [(8, "converted", 210), (16, "converted", 210),
                                                                         (32, "converted", 210)]
    energies = [r.mean_energy for r in report.results]
    assert energies == sorted(energies) and energies[0] > 0.05  # more rank, more captured energy


def test_zoo_hub_gguf_file_source_is_skipped_when_done(
    hub, tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``source: hub:ORG/NAME/FILE.gguf``: converted once; the re-run recognises the bundle as its own."""
    from huggingface_hub import HfApi
    from tiny_gguf import write_tiny_llama_gguf

    monkeypatch.setenv("PISSA_CACHE", str(tmp_path / "pissa-cache"))
    gguf = write_tiny_llama_gguf(tiny_llama, tmp_path / "tiny.gguf")
    api = HfApi(endpoint=hub.endpoint, token="hf_alice")
    api.create_repo("alice/tg")
    api.upload_file(path_or_fileobj=str(gguf), path_in_repo="tiny.F32.gguf", repo_id="alice/tg")
    manifest = _write(tmp_path / "zoo.yaml", """\
        entries:
          - name: tg
            source: hub:alice/tg/tiny.F32.gguf
            ranks: 4
        """)
    first = run_zoo(manifest, out=tmp_path / "out", progress=False)
    assert [r.status for r in first.results] == ["converted"], first.failed
    again = run_zoo(manifest, out=tmp_path / "out", progress=False)
    assert [r.status for r in again.results] == ["skipped"], again.results
