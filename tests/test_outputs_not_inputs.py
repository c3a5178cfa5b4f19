"""An output that is, or holds, one of the command's own inputs is refused before anything is written.

Found by a review (2026-12-08): with ``--overwrite`` these deleted the user's data (``convert SRC SRC``, ``convert
par/src par``, ``train B --out B``, ``export RUN --out RUN/adapter``), and ``plot --out data.jsonl`` replaced a data
file by a PNG. Every case here ran and destroyed its input before the fix. Each test works on copies.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from test_export import fake_training

from pissa.cli import run


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _refused(args: list[str], capsys: pytest.CaptureFixture[str], fragment: str) -> None:
    assert run(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and fragment in err[0], err


def test_convert_never_deletes_its_source(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "par" / "src"
    shutil.copytree(tiny_llama, src)
    (tmp_path / "par" / "important.txt").write_text("keep")
    before = _digest(tmp_path / "par")
    _refused(["convert", "-q", str(src), str(src), "--rank", "4", "--overwrite"], capsys, "is the input")
    _refused(["convert", "-q", str(src), str(tmp_path / "par"), "--rank", "4", "--overwrite"], capsys, "holds the input")
    assert _digest(tmp_path / "par") == before
    assert run(["convert", "-q", str(src), str(src / "bundle"), "--rank", "4"]) == 0  # inside the source: allowed


def test_train_never_deletes_its_bundle_or_data(tiny_llama_bundle: Path, arith_data: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_llama_bundle, bundle)
    data = tmp_path / "run" / "data.jsonl"
    data.parent.mkdir()
    shutil.copy(arith_data, data)
    before = (_digest(bundle), _digest(data))
    _refused(["train", str(bundle), "--data", str(data), "--out", str(bundle), "--overwrite", "--max-steps", "1"],
             capsys, "is the input")
    _refused(["train", str(bundle), "--data", str(data), "--out", str(data.parent), "--overwrite", "--max-steps", "1"],
             capsys, "holds the input")
    assert (_digest(bundle), _digest(data)) == before


def test_export_never_deletes_its_inputs(tiny_llama_bundle: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_llama_bundle, bundle)
    trained, _ = fake_training(bundle, tmp_path / "work")
    capsys.readouterr()  # the loading's progress bars
    before = (_digest(bundle), _digest(trained))
    for out in (trained, trained.parent, bundle):
        _refused(["export", str(trained), "--out", str(out), "--overwrite"], capsys, "the input")
    assert (_digest(bundle), _digest(trained)) == before
    assert run(["export", str(trained), "--out", str(tmp_path / "lora")]) == 0


def test_plot_writes_only_png_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "run"
    runs.mkdir()
    (runs / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    _refused(["plot", str(runs), "--out", str(data)], capsys, "is not a .png file")
    assert data.read_text() == '{"prompt": "a", "response": "b"}\n'
    _refused(["plot", str(runs), "--out", str(tmp_path)], capsys, "is not a .png file")
    assert not list(tmp_path.glob(".*tmp*"))
    # A run stopped while appending its last line: that line is left out, the rest is plotted.
    assert run(["plot", str(runs), "--out", str(tmp_path / "loss.png")]) == 0 and (tmp_path / "loss.png").stat().st_size
    (runs / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 3, "loss": 1.0}\n')
    assert run(["plot", str(runs), "--out", str(tmp_path / "loss.png")]) == 1
    assert "line 2 is not a JSON object" in capsys.readouterr().err
    (runs / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": "x"}\n{"step": 3, "loss": 1.0}\n')
    assert run(["plot", str(runs), "--out", str(tmp_path / "loss.png")]) == 1
    assert "metrics line 2 has a loss that is not a number" in capsys.readouterr().err
    (runs / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    _plot_error = ["plot", str(runs), "--out", str(data / "x.png")]  # under a file
    assert run(_plot_error) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "cannot write" in err[0] and "internal error" not in err[0], err


def test_train_on_a_broken_bundle_leaves_no_run_folder(tiny_llama_bundle: Path, arith_data: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    # Before: an internal error (SafetensorError / ValueError) after the run folder was written ("running").
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_llama_bundle, truncated)
    weights = next(truncated.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    no_config = tmp_path / "no-config"
    shutil.copytree(tiny_llama_bundle, no_config)
    (no_config / "config.json").unlink()
    for bundle in (truncated, no_config):
        out = tmp_path / f"run-{bundle.name}"
        assert run(["train", str(bundle), "--data", str(arith_data), "--out", str(out), "--max-steps", "1"]) == 1
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and "cannot load the bundle" in err[0] and "pissa verify" in err[0], err
        assert not out.exists()
    (tmp_path / "afile").write_text("x")
    _refused(["train", str(tiny_llama_bundle), "--data", str(arith_data), "--out", str(tmp_path / "afile")], capsys,
             "is a file")


def test_zoo_output_that_is_a_file(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "zoo.yaml"
    manifest.write_text(f"entries:\n  - name: t\n    source: {tiny_llama}\n    ranks: [4]\n")
    (tmp_path / "afile").write_text("x")
    _refused(["zoo", str(manifest), "--out", str(tmp_path / "afile")], capsys, "is a file")
    assert (tmp_path / "afile").read_text() == "x"
