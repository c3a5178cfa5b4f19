"""vLLM general plugin: two CPU multi-LoRA fixes, each probed and patched only where needed.

1. The "no adapter" index in the CPU LoRA ops (vllm-project/vllm#48421, #49656): below.
2. The LoRA slots of prompt-logprobs logits rows (vllm-project/vllm#16668): in
   :mod:`serving.vllm_prompt_logprobs`, installed by :func:`register` too.

The bug. vLLM gives every token (and every sampled row) a LoRA slot index, with ``-1`` meaning
"no adapter" (a base-model request). The GPU (Triton) kernels skip rows whose index is -1. The
PyTorch-native ops that the CPU backend uses (``vllm/lora/ops/torch_ops/lora_ops.py``) gather the
stacked slot weights with ``lora_weights[lora_indices_tensor]``; in Python/PyTorch ``w[-1]`` is the
LAST slot, so a base row is computed with whatever adapter sits in the last slot. That slot is all
zeros (harmless) until every slot is in use; then base requests batched with adapter requests (and,
in decode steps, base requests batched with anything) silently get the last slot's adapter.

The fix, per op: gather with ``idx.clamp(min=0)`` and zero the product rows whose index is < 0,
i.e. for row b with index i_b

    out_b = [i_b >= 0] · (x_b @ W[i_b]ᵀ)        (shrink: scaled by ``scaling``)

so a "no adapter" row adds exactly 0 (expand with ``add_inputs``) or is left untouched (expand
without ``add_inputs``, like the Triton kernels), and rows with a real slot are computed exactly as
before. The ``sgmv_*`` (prefill) ops call the ``bgmv_*`` ones through module globals, so they are
fixed too. ``punica_cpu`` imported the functions by name, so its namespace is patched as well.

:func:`register` is the entry point (``pyproject.toml``: ``[project.entry-points."vllm.general_plugins"]
pissa_cpu_lora_fix``). vLLM calls it in every process (API server, engine core, workers). It probes
the installed ops first and patches only when they show the bug, so a fixed vLLM, or a vLLM without
these ops, is left alone. Exclude it for a comparison run with ``VLLM_PLUGINS=`` (empty: no general
plugin) or a list of other plugin names.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import ModuleType
from typing import Any

from serving.lora_ops import FAST_OPS

# vLLM configures handlers only for its own "vllm" logger tree in its processes: log under it so the
# patch message shows in the server log next to vLLM's own lines.
logger = logging.getLogger(f"vllm.{__name__}")

PLUGIN_NAME = "pissa_cpu_lora_fix"
_FIXED_MARK = "_pissa_cpu_lora_fix"
_OP_NAMES = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
# Which ops replace vLLM's: "fast" (serving/lora_ops.py, the default: correct and faster) or "fixed" (the
# minimal fix below: vLLM's gather + einsum with index -1 masked), for comparison runs.
OPS_ENV = "PISSA_CPU_LORA_OPS"


# --- fixed ops (pure tensor functions, same signatures as vLLM's torch_ops) -----------------------
def _masked_product(inputs: Any, weights: Any, indices: Any, dtype: Any) -> tuple[Any, Any]:
    """``(x_b @ W[i_b]ᵀ for each row b, mask i_b >= 0)`` with rows of index < 0 set to 0."""
    import torch

    valid = indices >= 0
    selected = weights[indices.clamp(min=0)].to(dtype=dtype)
    if selected.dim() == 4:
        selected = selected.squeeze(dim=1)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=dtype), selected)
    outputs = torch.where(valid.unsqueeze(1), outputs, torch.zeros((), dtype=dtype))
    return outputs, valid


def bgmv_shrink(inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any,
                scaling: float = 1.0) -> None:
    """``output[b, :r] = scaling · x_b @ A[i_b]ᵀ`` for i_b >= 0, and 0 for "no adapter" rows."""
    outputs, _ = _masked_product(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs[:]


def bgmv_expand(inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any,
                add_inputs: bool = True) -> None:
    """``output[b] (+)= x_b @ B[i_b]ᵀ`` for i_b >= 0; "no adapter" rows are left unchanged."""
    import torch

    outputs, valid = _masked_product(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    common_len = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        current = output_tensor[:, :common_len]
        output_tensor[:, :common_len] = torch.where(
            valid[:limit].unsqueeze(1), outputs[:limit, :common_len], current
        )


def bgmv_expand_slice(inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any,
                      slice_offset: int, slice_size: int, add_inputs: bool = True) -> None:
    """``output[b, off:off+size] (+)= x_b @ B[i_b]ᵀ`` for i_b >= 0; other rows unchanged."""
    import torch

    outputs, valid = _masked_product(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    window = output_tensor[:, slice_offset : slice_offset + slice_size]
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs[:]
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = torch.where(
            valid.unsqueeze(1), outputs, window
        )


FIXED_OPS: dict[str, Callable[..., None]] = {
    "bgmv_shrink": bgmv_shrink,
    "bgmv_expand": bgmv_expand,
    "bgmv_expand_slice": bgmv_expand_slice,
}
for _fn in (*FIXED_OPS.values(), *FAST_OPS.values()):
    setattr(_fn, _FIXED_MARK, True)


def chosen_ops(environ: dict[str, str] | None = None) -> dict[str, Callable[..., None]]:
    """The replacement ops ``PISSA_CPU_LORA_OPS`` asks for: ``fast`` (default) or ``fixed``."""
    import os

    mode = (environ if environ is not None else os.environ).get(OPS_ENV, "fast").strip().lower()
    if mode not in ("fast", "fixed"):
        logger.warning("%s=%r is neither fast nor fixed: using fast", OPS_ENV, mode)
        mode = "fast"
    return FAST_OPS if mode == "fast" else FIXED_OPS


def fast_ops_are_faster(shrink: Callable[..., None], expand_slice: Callable[..., None],
                        rows: int = 32, slots: int = 4, rank: int = 8, dim: int = 1024,
                        repeats: int = 5) -> tuple[bool, float, float]:
    """Time a decode step's shrink + expand_slice, installed ops vs :mod:`serving.lora_ops` (all rows with
    an adapter, so both compute the same thing); ``(ours faster, theirs µs, ours µs)``, best of ``repeats``."""
    import time

    import torch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, dim, generator=gen)
    a = torch.randn(slots, 1, rank, dim, generator=gen)
    b = torch.randn(slots, 1, dim, rank, generator=gen)
    idx = torch.arange(rows) % slots
    buf, y = torch.zeros(rows, rank), torch.zeros(rows, dim)

    def best(s: Callable[..., None], e: Callable[..., None]) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            s(x, a, buf, idx, 1.0)
            e(buf, b, y, idx, 0, dim, True)
            times.append(time.perf_counter() - t0)
        return min(times) * 1e6

    best(shrink, expand_slice), best(FAST_OPS["bgmv_shrink"], FAST_OPS["bgmv_expand_slice"])  # warm up
    theirs = best(shrink, expand_slice)
    ours = best(FAST_OPS["bgmv_shrink"], FAST_OPS["bgmv_expand_slice"])
    return ours < theirs, theirs, ours


# --- detection and patching ---------------------------------------------------------------------
def ops_have_negative_index_bug(shrink: Callable[..., None]) -> bool:
    """True when ``shrink`` applies the LAST slot to a row whose LoRA index is -1.

    Probe: two slots, slot 1 all ones, one input row with index -1; a correct op writes 0.
    """
    import torch

    weights = torch.zeros(2, 1, 1, 1)
    weights[1] = 1.0
    out = torch.zeros(1, 1)
    shrink(torch.ones(1, 1), weights, out, torch.tensor([-1]), 1.0)
    return bool(out.abs().sum() > 0)


def _import_targets() -> list[ModuleType]:
    """vLLM modules that hold the CPU ops by name (missing ones are skipped)."""
    import importlib

    modules = []
    for name in (
        "vllm.lora.ops.torch_ops.lora_ops",
        "vllm.lora.ops.torch_ops",
        "vllm.lora.punica_wrapper.punica_cpu",
    ):
        try:
            modules.append(importlib.import_module(name))
        except Exception as exc:  # noqa: BLE001 - a vLLM without this module simply needs no patch
            logger.debug("%s not importable (%s): nothing to patch there", name, exc)
    return modules


def patch_modules(modules: list[ModuleType], ops: dict[str, Callable[..., None]] | None = None) -> list[str]:
    """Replace the ops named in ``ops`` (default: :data:`FIXED_OPS`) in each module that has them; returns
    the ``module.op`` names patched."""
    ops = FIXED_OPS if ops is None else ops
    patched = []
    for module in modules:
        for op, fn in ops.items():
            current = getattr(module, op, None)
            if current is None or getattr(current, _FIXED_MARK, False):
                continue
            setattr(module, op, fn)
            patched.append(f"{module.__name__}.{op}")
    return patched


def patch_fused_linear(modules: list[ModuleType]) -> list[str]:
    """Replace ``PunicaWrapperCPU.add_lora_linear`` and ``add_lora_logits`` with :mod:`serving.lora_fused`'s
    (every slice of a layer at once for decode-sized batches; no logits LoRA work while no loaded adapter
    has an ``lm_head``; the patched ops otherwise). Idempotent."""
    from serving.lora_fused import make_add_lora_linear, make_add_lora_logits

    patched = []
    for module in modules:
        cls = getattr(module, "PunicaWrapperCPU", None)
        for name, make in (("add_lora_linear", make_add_lora_linear), ("add_lora_logits", make_add_lora_logits)):
            original = getattr(cls, name, None)
            if original is None or getattr(original, _FIXED_MARK, False):  # no wrapper class, or patched
                continue
            replacement = make(original)
            setattr(replacement, _FIXED_MARK, True)
            setattr(cls, name, replacement)
            patched.append(f"{module.__name__}.PunicaWrapperCPU.{name}")
    return patched


def is_active() -> bool:
    """True when the installed vLLM's CPU ops are the fixed ones (in this process)."""
    try:
        from vllm.lora.ops.torch_ops import lora_ops
    except Exception:  # noqa: BLE001
        return False
    return getattr(lora_ops.bgmv_shrink, _FIXED_MARK, False)


def register() -> None:
    """vLLM plugin entry point: both fixes, each patched if (and only if) the installed vLLM needs it.

    1. The CPU LoRA ops' index -1 (this module): patched now if they show the bug.
    2. LoRA slots for prompt-logprobs logits rows (:mod:`serving.vllm_prompt_logprobs`): patched when
       vLLM's model runner is imported, if the probe shows the per-request mapping.

    Safe to call many times and in every process. Never raises: a failure is logged and vLLM runs
    unpatched (the tests would then fail:
    ``tests/test_vllm_plugin.py::test_mixed_batch_wrong_without_plugin_zero_wrong_with_it``,
    ``tests/test_vllm_server.py::test_mixed_concurrent_batch_zero_wrong`` and
    ``tests/test_vllm_prompt_logprobs.py``, ``tests/test_vllm_server_logprobs.py``).
    """
    _register_ops_fix()
    try:
        from serving import vllm_prompt_logprobs

        vllm_prompt_logprobs.install()
    except Exception:  # noqa: BLE001 - a plugin must never take the server down
        logger.exception("%s: could not install the prompt-logprobs LoRA fix", PLUGIN_NAME)


def _register_ops_fix() -> None:
    """Patch the CPU LoRA ops if (and only if) they show the -1 bug; never raises."""
    try:
        modules = _import_targets()
        ops = next((m for m in modules if m.__name__.endswith("lora_ops")), None)
        if ops is None:
            return
        if getattr(ops.bgmv_shrink, _FIXED_MARK, False):
            return
        replacement = chosen_ops()
        kind = "fast" if replacement is FAST_OPS else "fixed"
        if ops_have_negative_index_bug(ops.bgmv_shrink):
            reason = "index -1 = no adapter"
        elif replacement is FAST_OPS:
            faster, theirs, ours = fast_ops_are_faster(ops.bgmv_shrink, ops.bgmv_expand_slice)
            if not faster:
                logger.info("%s: vLLM's CPU LoRA ops are correct and not slower (%.0f µs vs ours %.0f µs per "
                            "decode step probe): no patch", PLUGIN_NAME, theirs, ours)
                return
            reason = f"speed: {theirs:.0f} µs -> {ours:.0f} µs per decode step probe"
        else:
            logger.debug("vLLM CPU LoRA ops handle index -1 correctly: no patch needed")
            return
        patched = patch_modules(modules, replacement)
        if replacement is FAST_OPS:
            patched += patch_fused_linear(modules)
        logger.info("%s: patched %d CPU LoRA ops with the %s ops (%s)", PLUGIN_NAME, len(patched), kind, reason)
    except Exception:  # noqa: BLE001 - a plugin must never take the server down
        logger.exception("%s: could not patch vLLM's CPU LoRA ops", PLUGIN_NAME)
