"""Training on CPU with tiny models: the loss decreases, --resume continues the same trajectory,
the plain-LoRA baseline, metrics/plots, and train → export ≡ residual + trained adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from converter.export import export
from pissa.cli import run
from pissa.core.errors import InvalidOptionsError, OutputExistsError
from training.metrics import read_metrics
from training.train import train

# Small, learnable data: the response is a fixed function of the prompt.
FAST = dict(lr=2e-2, batch_size=4, max_length=64, log_every=1, seed=0)


@pytest.fixture(scope="module")
def data(arith_data: Path) -> Path:
    return arith_data


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_llama_bundle, data):
    """8 uninterrupted steps, checkpoints every 4, eval data = train data."""
    out = tmp_path_factory.mktemp("runs") / "full"
    result = train(tiny_llama_bundle, data, out, max_steps=8, save_every=4, eval_data=str(data), eval_every=4,
                   progress=False, **FAST)
    return out, result


def losses(run: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run) if "loss" in m]


def test_loss_decreases_and_run_layout(full_run):
    out, result = full_run
    ls = losses(out)
    assert len(ls) == 8
    # Near-uniform start (ln 320 ≈ 5.77 for a random tiny model); 0.15 nats is far beyond step noise.
    assert sum(ls[-2:]) / 2 < sum(ls[:2]) / 2 - 0.15, ls
    assert result.steps == 8 and result.final_loss == ls[-1] and result.first_loss == ls[0]
    line = read_metrics(out)[0]
    assert set(line) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s"} and line["step"] == 1
    evals = [m for m in read_metrics(out) if "eval_loss" in m]
    assert [m["step"] for m in evals] == [4, 8] and result.eval_loss == evals[-1]["eval_loss"]
    assert (out / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-8"]
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "finished" and record["data"]["examples"] == 16
    assert json.loads((out / "adapter/pissa_training.json").read_text())["init"] == "pissa"
    assert result.tokens_per_second and result.tokens_per_second > 0


def test_resume_continues_the_same_trajectory(tmp_path, full_run, tiny_llama_bundle, data):
    """Stop after step 4 (a checkpoint), resume: steps 5–8 match the uninterrupted run (rel 1e-5)."""
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                control.should_training_stop = True

    out = tmp_path / "resumed"
    opts = dict(max_steps=8, save_every=4, eval_data=str(data), eval_every=4, progress=False, **FAST)
    first = train(tiny_llama_bundle, data, out, callbacks=[StopAt()], **opts)
    assert first.steps == 4
    second = train(tiny_llama_bundle, data, out, resume=True, **opts)
    assert second.steps == 8
    full = losses(full_run[0])
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == list(range(1, 9))
    assert losses(out) == pytest.approx(full, rel=1e-5)
    with pytest.raises(InvalidOptionsError, match="option lr was"):
        train(tiny_llama_bundle, data, out, resume=True, **{**opts, "lr": 1e-3})
    with pytest.raises(OutputExistsError):
        train(tiny_llama_bundle, data, out, **opts)
    # All 8 steps are trained: resuming again would run a 9th at learning rate 0 (a review, 2026-12-08).
    with pytest.raises(InvalidOptionsError, match="has trained all 8 steps") as exc:
        train(tiny_llama_bundle, data, out, resume=True, **opts)
    assert exc.value.fix == f"export it: `pissa export {out}`"


def test_resume_keeps_the_checkpoint_cadence(tmp_path, tiny_llama_bundle, data):
    """--resume without --save-every went on without checkpoints and recorded save_every None."""
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                control.should_training_stop = True

    out = tmp_path / "run"
    train(tiny_llama_bundle, data, out, max_steps=6, save_every=2, progress=False, callbacks=[StopAt()], **FAST)
    train(tiny_llama_bundle, data, out, max_steps=6, resume=True, progress=False, **FAST)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert json.loads((out / "run.json").read_text())["options"]["save_every"] == 2


def test_trained_run_exports_exactly(tmp_path, full_run, tiny_llama_bundle, tiny_llama):
    """Real training, then export: base + exported LoRA ≡ residual + trained adapter (fp32, atol 1e-4);
    a checkpoint exports too."""
    from test_export import base_with_adapter, load_residual_with_adapter, logits

    out, _ = full_run
    export(out, tmp_path / "lora")
    ref = logits(load_residual_with_adapter(tiny_llama_bundle, out / "adapter"))
    torch.testing.assert_close(logits(base_with_adapter(tiny_llama, tmp_path / "lora")), ref, atol=1e-4, rtol=0)
    report = export(out / "checkpoints" / "checkpoint-4", tmp_path / "ck4")
    assert report.mode == "exact"


def test_lora_baseline(tmp_path, tiny_llama_bundle, tiny_llama, data):
    """--init lora: same rank/targets on the ORIGINAL base (rebuilt from the bundle), B starts at zero."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from pissa.core.formats.bundle import open_bundle
    from training.options import TrainOptions
    from training.train import load_model

    model = load_model(open_bundle(tiny_llama_bundle), TrainOptions(init="lora"))
    original = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    from test_export import logits

    # B = 0: the untrained baseline is the original model (residual + B₀A₀ rounding only).
    torch.testing.assert_close(logits(model.eval()), logits(original), atol=1e-4, rtol=0)
    out = tmp_path / "lora"
    result = train(tiny_llama_bundle, data, out, init="lora", max_steps=4, progress=False, **FAST)
    assert result.init == "lora" and len(losses(out)) == 4
    cfg = json.loads((out / "adapter/adapter_config.json").read_text())
    init_cfg = json.loads((tiny_llama_bundle / "pissa_init/adapter_config.json").read_text())
    assert cfg["r"] == init_cfg["r"] and sorted(cfg["target_modules"]) == sorted(init_cfg["target_modules"])
    assert cfg["base_model_name_or_path"] == str(tiny_llama)
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                        out / "adapter")
    assert (logits(trained.eval()) - logits(original)).abs().max() > 1e-3
    assert len(load_file(str(out / "adapter/adapter_model.safetensors"))) == 28


def test_cli_train_and_plot(tmp_path, full_run, tiny_llama_bundle, data, capsys):
    out = tmp_path / "cli"
    code = run(["train", str(tiny_llama_bundle), "--data", str(data), "--out", str(out), "--max-steps", "2",
                "--batch-size", "4", "--lr", "1e-3", "--no-progress", "--init", "lora"])
    assert code == 0, capsys.readouterr().err
    assert "trained lora for 2 steps" in capsys.readouterr().out
    assert run(["plot", str(full_run[0]), str(out), "--out", str(tmp_path / "cmp.png")]) == 0
    assert (tmp_path / "cmp.png").stat().st_size > 1000
    assert run(["plot", str(tmp_path / "nope")]) == 1
    assert "nope does not exist" in capsys.readouterr().err
    (tmp_path / "empty-run").mkdir()
    assert run(["plot", str(tmp_path / "empty-run")]) == 1
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_bad_options_are_reported_together(tmp_path, tiny_llama_bundle, data, capsys):
    code = run(["train", str(tiny_llama_bundle), "--data", str(data), "--out", str(tmp_path / "x"),
                "--max-steps", "0", "--lr", "-1", "--eval-every", "3"])
    err = capsys.readouterr().err
    assert code == 2 and "--max-steps must be >= 1" in err and "--lr must be > 0" in err
    assert "--eval-every needs --eval-data" in err and "3 problems" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    assert run(["train", str(tiny_llama_bundle), "--data", str(bad), "--out", str(tmp_path / "y")]) == 2
    assert f"{bad}:1: missing 'response'" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def shown_losses(stderr: str) -> list[str]:
    """The training losses a progress bar showed (its ``loss=`` postfix), in order, without repeats."""
    import re

    shown: list[str] = []
    for value in re.findall(r"(?<![a-z_])loss=([-+0-9.e]+)", stderr):
        if not shown or shown[-1] != value:
            shown.append(value)
    return shown


def test_cli_train_shows_progress_with_the_logged_losses(tmp_path, tiny_llama_bundle, data, capsys):
    """`pissa train` shows a bar on stderr: step/total and, after each logged step, the logged loss."""
    out = tmp_path / "bar"
    code = run(["train", str(tiny_llama_bundle), "--data", str(data), "--out", str(out), "--max-steps", "3",
                "--batch-size", "4", "--lr", "1e-2"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "3/3" in err
    assert shown_losses(err) == [f"{m['loss']:.4g}" for m in read_metrics(out) if "loss" in m], err[-2000:]


@pytest.fixture
def demo_quiet():
    """The demo's library silencing (transformers at ERROR, no HF bars, our loggers at WARNING), undone after."""
    import logging

    from transformers.utils import logging as hf_logging

    import pissa.demo as demo

    names = ("converter", "training", "serving")
    levels = {n: logging.getLogger(n).level for n in names}
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    demo._quiet_libraries()
    yield demo
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)
    hf_logging.set_verbosity(verbosity)
    if bars:
        hf_logging.enable_progress_bar()


def test_demo_training_step_shows_progress(tmp_path, tiny_llama_bundle, demo_quiet, monkeypatch, capsys):
    """The demo's train step (minutes on SmolLM2) shows step/total and the logged losses while it runs,
    with the demo's library logging turned off (here on the tiny bundle, 3 steps of the shipped task)."""
    demo = demo_quiet
    monkeypatch.setattr(demo, "TRAIN_STEPS", 3)
    state = demo._State(workdir=tmp_path, gguf=tmp_path / "unused.gguf", bundle=tiny_llama_bundle)
    detail = demo.step_train(state)
    err = capsys.readouterr().err
    assert detail.startswith("3 steps on arith_train.jsonl")
    assert "3/3" in err, err[-2000:]
    logged = [f"{m['loss']:.4g}" for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert len(logged) == 3 and shown_losses(err) == logged, err[-2000:]


def test_accelerate_cpu_launch_of_one_process_is_refused(tmp_path, tiny_llama_bundle, data, monkeypatch, capsys):
    """`accelerate launch --cpu --num_processes 2` starts ONE process (several CPU processes need MPI);
    that process would train alone: refuse, say which launch line works, write nothing."""
    # The environment accelerate's simple launcher gives its one process when asked for 2 (accelerate 1.x).
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "alone"
    code = run(["train", str(tiny_llama_bundle), "--data", str(data), "--out", str(out), "--max-steps", "1"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "--num_processes > 1 starts a single process" in err and "--multi_gpu --num_processes N" in err
    assert not out.exists()


def test_resume_refuses_another_number_of_processes(tmp_path, full_run, tiny_llama_bundle, data):
    """A run trained by 2 processes cannot be resumed by 1: the effective batch would change."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(full_run[0], out)
    record = json.loads((out / "run.json").read_text())
    assert record["world_size"] == 1 and record["effective_batch_size"] == FAST["batch_size"]
    record["world_size"] = 2
    (out / "run.json").write_text(json.dumps(record))
    opts = dict(max_steps=8, save_every=4, eval_data=str(data), eval_every=4, progress=False, **FAST)
    with pytest.raises(InvalidOptionsError) as info:
        train(tiny_llama_bundle, data, out, resume=True, **opts)
    assert "the run was trained by 2 processes, now 1" in "\n".join(info.value.problems())
