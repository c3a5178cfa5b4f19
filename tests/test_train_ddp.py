"""Data-parallel training (DDP, gloo on CPU): 2 processes with batch b train ONE run that follows the
run of one process with batch 2b.

Why the two runs see the same examples at every step: the Trainer's sampler is accelerate's
``SeedableRandomSampler`` seeded with ``data_seed``, the same permutation in every process; accelerate's
``BatchSamplerShard`` (``split_batches=False``) gives rank k the batches k, k+W, ... of size b, so step i
covers positions [i·W·b, (i+1)·W·b) of the permutation, the batch one process with batch W·b takes.
(Only at the end of an epoch that does not fill a global batch would DDP complete it from the start of
the data while one process takes a shorter batch; 16 examples / batch 4 never hits that.)

Why the losses agree: the loss of a step is averaged over the response tokens of the whole global
batch (``average_tokens_across_devices``: each rank divides its token-summed loss by the token count
gathered from both ranks), and DDP averages the gradients by an all-reduce. Both runs compute the same
sums in fp32 in another order, so they differ by rounding only: observed ≤ 2e-7 relative over 4 steps.
Tolerance: rel 1e-5 per step on the loss and the gradient norm (50× the observed rounding, while a
different batch or a rank training alone moves the loss by far more: consecutive steps differ by
≥ 8e-4 relative here, 5.776 → 5.694 → 5.641 → 5.646).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.metrics import read_metrics
from training.train import train

STEPS, PER_DEVICE, LR = 4, 2, 1e-2
REL = 1e-5


LAUNCHERS = {
    # The launch lines docs/training.md offers for CPU (`accelerate` is accelerate_cli's console script).
    "torchrun": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    "accelerate": ["-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes", "2"],
}


def launch_train(launcher: str, bundle: Path, data: Path, out: Path) -> subprocess.CompletedProcess:
    """``<launcher> -m pissa train BUNDLE --data D --out RUN ...`` in 2 processes."""
    cmd = [
        sys.executable, *LAUNCHERS[launcher],
        "-m", "pissa", "train", str(bundle), "--data", str(data), "--out", str(out),
        "--max-steps", str(STEPS), "--batch-size", str(PER_DEVICE), "--lr", str(LR), "--no-progress",
    ]
    # Transformers' warnings on, to see that none says the ranks train alone.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "warning"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=out.parent)


@pytest.fixture(scope="module")
def data(arith_data: Path) -> Path:
    return arith_data


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_llama_bundle, data) -> Path:
    """The reference: one process with batch 2b."""
    out = tmp_path_factory.mktemp("ddp-single") / "single"
    result = train(tiny_llama_bundle, data, out, max_steps=STEPS, batch_size=2 * PER_DEVICE, lr=LR, progress=False)
    assert result.world_size == 1 and result.effective_batch_size == 2 * PER_DEVICE
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_ranks_train_one_run_like_one_process_with_twice_the_batch(launcher, tiny_llama_bundle, data, single,
                                                                       tmp_path):
    ddp = tmp_path / "ddp"
    proc = launch_train(launcher, tiny_llama_bundle, data, ddp)
    assert proc.returncode == 0, f"{launcher} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "parallel_mode != ParallelMode.DISTRIBUTED" not in proc.stdout + proc.stderr
    # Both ranks started (each logs its share at INFO), then one summary (rank 0's).
    assert "rank 0 of 2" in proc.stderr and "rank 1 of 2" in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout.count("trained pissa for 4 steps") == 1, proc.stdout
    assert proc.stdout.count("2 processes, effective batch 4") == 1, proc.stdout

    # One metrics line per step, one adapter: the same files as one process writes.
    assert sorted(p.relative_to(ddp).as_posix() for p in ddp.rglob("*")) == \
        sorted(p.relative_to(single).as_posix() for p in single.rglob("*"))
    record = json.loads((ddp / "run.json").read_text())
    assert record["status"] == "finished"
    assert (record["world_size"], record["effective_batch_size"]) == (2, 2 * PER_DEVICE)
    assert record["options"]["batch_size"] == PER_DEVICE
    assert json.loads((single / "run.json").read_text())["world_size"] == 1

    lines = [m for m in read_metrics(ddp) if "loss" in m]
    ref = [m for m in read_metrics(single) if "loss" in m]
    assert [m["step"] for m in lines] == [m["step"] for m in ref] == list(range(1, STEPS + 1))
    for got, want in zip(lines, ref):
        assert got["loss"] == pytest.approx(want["loss"], rel=REL), (lines, ref)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=REL), (lines, ref)
    worst = max(abs(g["loss"] - w["loss"]) / w["loss"] for g, w in zip(lines, ref))
    print(f"worst relative loss difference, 2 ranks x {PER_DEVICE} vs 1 x {2 * PER_DEVICE}: {worst:.1e}")
    # The sharpness of the comparison: consecutive steps differ by far more than the tolerance.
    assert min(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(ref, ref[1:])) > 50 * REL

    # The same trained adapter, per tensor ‖ddp − single‖/‖single‖ ≤ 1e-4 (observed ≤ 3e-6; elementwise
    # it is looser: Adam divides by √v, which magnifies rounding in entries whose gradient is near zero).
    # Training moved every tensor 12–21% (relative norm) from the bundle's pissa_init.
    a = load_file(str(ddp / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(single / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert (torch.linalg.norm(a[name] - b[name]) / torch.linalg.norm(b[name])).item() <= 1e-4, name
