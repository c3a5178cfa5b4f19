"""GPU paths (skipped on CPU-only machines: the ``gpu`` marker)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from converter.convert import convert
from converter.options import ConvertOptions


@pytest.mark.gpu
@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_cuda_conversion_matches_cpu(tiny_llama, tmp_path, svd):
    """Same bundle on CUDA as on CPU up to float32 rounding (different kernels, so not bit-identical)."""
    cpu = convert(tiny_llama, tmp_path / "cpu", ConvertOptions(rank=8, svd=svd), progress=False)
    gpu = convert(tiny_llama, tmp_path / "gpu", ConvertOptions(rank=8, svd=svd, device="cuda"), progress=False)
    assert gpu.max_rel_error < 1e-6
    a = load_file(tmp_path / "cpu" / "model.safetensors")
    b = load_file(tmp_path / "gpu" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-4, rtol=0)
    assert abs(gpu.mean_energy - cpu.mean_energy) < 1e-4
