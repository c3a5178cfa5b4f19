"""vLLM plugin part: LoRA on the logits of PROMPT tokens (prompt logprobs, ``echo`` + ``logprobs``).

The bug (vllm-project/vllm#16668, #17766, #51594; fixes proposed in #16694, #51597). vLLM applies an
adapter's ``lm_head`` LoRA to the logits with one LoRA slot per *sampled row*, i.e. per request:
``PunicaWrapperBase.sampler_indices`` (``vllm/lora/punica_wrapper/punica_base.py:263``), built from
``LoRAMapping.prompt_mapping``. Prompt logprobs compute logits for every *prompt token*:
``GPUModelRunner._get_prompt_logprobs_dict`` (``vllm/v1/worker/gpu_model_runner.py:5306``) calls
``self.model.compute_logits(hidden_states[offset : offset + num_logits])`` per request (line 5375).
On CPU, ``PunicaWrapperCPU.add_lora_logits`` (``vllm/lora/punica_wrapper/punica_cpu.py:349-350``)
then multiplies ``num_logits`` rows by ``num_requests`` slot indices:

- one request in the batch: the single index broadcasts over the rows (correct by luck);
- ``num_logits == num_requests``: row k silently gets request k's adapter (wrong logprobs);
- otherwise: ``einsum(): subscript b has size 3 ... previously seen size 17`` in the engine core,
  which kills the engine (every later request gets HTTP 500). The logits LoRA layer exists whenever
  LoRA is enabled, so this crashes even when no adapter targets ``lm_head``.

The fix. Around each of those ``compute_logits`` calls, the logits LoRA gets one slot per row: row r
of the batch (a scheduled token) gets the slot the forward pass itself used for that token,
``punica.token_lora_indices[r]`` (-1 = base model, no adapter), see :func:`prompt_row_slots`. The
row range of the call is read from the view it receives (:func:`view_rows`: the runner slices the
batch's hidden states, so the argument is a row window of them). The per-request slots are
restored after each call, so the sampling rows of the same batch (computed before, in
``execute_model``, and after, in the next step) keep their own mapping.

GPU. The patched method, ``_get_prompt_logprobs_dict``, is shared: ``CPUModelRunner``
(``vllm/v1/worker/cpu_model_runner.py:23``) inherits it from ``GPUModelRunner``. The GPU logits
LoRA has the same per-request mapping (``PunicaWrapperGPU.add_lora_logits`` reads
``prompt_mapping_meta``, prepared from ``sampler_indices`` at ``punica_gpu.py:89``, used at lines
316/326), but this patch installs per-row slots only into the CPU wrapper (``PunicaWrapperCPU``):
the GPU kernels' metadata is not touched (no GPU here to test it); on a GPU the method runs as
vLLM wrote it.

Guarded like the CPU ops fix: installed when ``vllm.v1.worker.gpu_model_runner`` is imported (a
post-import hook, so the API-server process, which never imports the runner, pays nothing); patched
only when the probe :func:`logits_lora_is_per_request` shows that the installed ``PunicaWrapperCPU``
maps logits rows per request; a no-op otherwise, or with ``PISSA_VLLM_PROMPT_LOGPROBS_FIX=0``.
"""

from __future__ import annotations

import functools
import importlib.abc
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

logger = logging.getLogger(f"vllm.{__name__}")

ENV_SWITCH = "PISSA_VLLM_PROMPT_LOGPROBS_FIX"
RUNNER_MODULE = "vllm.v1.worker.gpu_model_runner"
_METHOD = "_get_prompt_logprobs_dict"
_FIXED_MARK = "_pissa_prompt_logprobs_fix"
_PUNICA_CACHE = "_pissa_logits_punica"


# --- pure maths -----------------------------------------------------------------------------------
def view_rows(view: Any, base: Any) -> tuple[int, int] | None:
    """``(first_row, n_rows)`` when ``view`` is the row window ``base[first_row : first_row + n_rows]``.

    Read from tensor metadata only (same storage, same trailing shape and strides, a storage offset
    that is a whole number of rows past ``base``'s); ``None`` when ``view`` is not such a window.
    """
    if view.dim() != base.dim() or view.dim() < 1 or view.shape[1:] != base.shape[1:]:
        return None
    if view.stride() != base.stride() or view.untyped_storage().data_ptr() != base.untyped_storage().data_ptr():
        return None
    delta = view.storage_offset() - base.storage_offset()
    row = base.stride(0)
    if row <= 0 or delta < 0 or delta % row:
        return None
    first = delta // row
    if first + view.shape[0] > base.shape[0]:
        return None
    return first, int(view.shape[0])


def prompt_row_slots(token_slots: Any, first_row: int, n_rows: int) -> Any:
    """LoRA slot of each logits row ``first_row .. first_row + n_rows - 1`` of the scheduled batch.

    ``token_slots[t]`` is the slot of the request that scheduled token t belongs to (-1: no adapter),
    exactly the index the forward pass used for that token; a prompt-logprobs row is the hidden state
    of one scheduled token, so ``slot(row r) = token_slots[r]``.

    Raises:
        ValueError: the rows are not all inside the batch.
    """
    if first_row < 0 or n_rows < 0 or first_row + n_rows > token_slots.shape[0]:
        raise ValueError(f"rows {first_row}..{first_row + n_rows} outside a batch of {token_slots.shape[0]} tokens")
    return token_slots[first_row : first_row + n_rows]


# --- installing per-row slots into the CPU wrapper ------------------------------------------------
@contextmanager
def sampler_slots(punica: Any, slots: Any) -> Iterator[None]:
    """Make ``punica.sampler_indices`` equal ``slots`` inside the block; restore it afterwards."""
    saved_len = punica.indices_len[1]
    saved = punica._sampler_indices[:saved_len].clone()
    punica._sampler_indices[: slots.shape[0]].copy_(slots)
    punica.indices_len[1] = int(slots.shape[0])
    try:
        yield
    finally:
        punica._sampler_indices[:saved_len].copy_(saved)
        punica.indices_len[1] = saved_len


def _cpu_logits_punica(runner: Any) -> Any:
    """The CPU punica wrapper of the runner's logits LoRA layer, or None (no LoRA, or not CPU)."""
    if _PUNICA_CACHE in runner.__dict__:
        return runner.__dict__[_PUNICA_CACHE]
    found = None
    try:
        from vllm.lora.layers.logits_processor import LogitsProcessorWithLoRA
        from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

        model = runner.get_model() if hasattr(runner, "get_model") else runner.model
        for module in model.modules():
            if isinstance(module, LogitsProcessorWithLoRA):
                punica = getattr(module, "punica_wrapper", None)
                if isinstance(punica, PunicaWrapperCPU):
                    found = punica
                break
    except Exception:  # noqa: BLE001 - no LoRA layer or another vLLM layout: run vLLM's code as is
        logger.debug("no CPU logits LoRA layer found", exc_info=True)
    runner.__dict__[_PUNICA_CACHE] = found
    return found


def fixed_prompt_logprobs(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``GPUModelRunner._get_prompt_logprobs_dict`` so each logits row gets its token's LoRA slot."""

    @functools.wraps(original)
    def _get_prompt_logprobs_dict(self: Any, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        punica = _cpu_logits_punica(self) if getattr(self, "num_prompt_logprobs", None) else None
        if punica is None:
            return original(self, hidden_states, *args, **kwargs)
        model = self.model
        compute_logits = model.compute_logits
        token_slots = punica.token_lora_indices

        def per_row_compute_logits(states: Any, *a: Any, **kw: Any) -> Any:
            rows = view_rows(states, hidden_states)
            if rows is None or rows[0] + rows[1] > token_slots.shape[0]:
                logger.warning("prompt logprobs: logits rows not a window of the batch; LoRA mapping left as is")
                return compute_logits(states, *a, **kw)
            with sampler_slots(punica, prompt_row_slots(token_slots, *rows)):
                return compute_logits(states, *a, **kw)

        model.compute_logits = per_row_compute_logits
        try:
            return original(self, hidden_states, *args, **kwargs)
        finally:
            del model.compute_logits

    setattr(_get_prompt_logprobs_dict, _FIXED_MARK, True)
    return _get_prompt_logprobs_dict


# --- probe, patch, post-import hook ---------------------------------------------------------------
def logits_lora_is_per_request() -> bool:
    """True when the installed ``PunicaWrapperCPU`` applies the logits LoRA per request, not per row.

    Probe: two requests of 3 prompt tokens each, in slots 0 and 1, distinct lm_head adapters; the 6
    prompt-token rows go through ``add_lora_logits`` as ``_get_prompt_logprobs_dict`` sends them.
    A per-row-correct wrapper gives rows 0-2 slot 0's delta and rows 3-5 slot 1's; vLLM 0.32 raises
    (6 rows, 2 indices).
    """
    import torch
    from vllm.lora.layers.utils import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    punica = PunicaWrapperCPU(16, 4, "cpu")
    punica.update_metadata(LoRAMapping((1, 1, 1, 2, 2, 2), (1, 2), is_prefill=True), [1, 2], 3, 5)
    hidden, vocab = 2, 5
    lora_a = torch.ones(2, 1, 1, hidden)
    lora_b = torch.stack([torch.full((1, vocab, 1), 1.0), torch.full((1, vocab, 1), 2.0)])
    x = torch.ones(6, hidden)
    y = torch.zeros(6, vocab)
    try:
        punica.add_lora_logits(y, x, lora_a, lora_b, 1.0)
    except RuntimeError:
        return True
    want = torch.tensor([2.0] * 3 + [4.0] * 3).unsqueeze(1).expand(6, vocab)
    return not torch.equal(y, want)


def patch_runner(module: ModuleType) -> bool:
    """Patch ``module.GPUModelRunner._get_prompt_logprobs_dict`` if needed; True when patched now."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        logger.info("prompt-logprobs LoRA fix disabled (%s=0)", ENV_SWITCH)
        return False
    runner = getattr(module, "GPUModelRunner", None)
    original = getattr(runner, _METHOD, None)
    if runner is None or original is None:
        logger.debug("%s has no GPUModelRunner.%s: nothing to patch", module.__name__, _METHOD)
        return False
    if getattr(original, _FIXED_MARK, False):
        return False
    if not logits_lora_is_per_request():
        logger.debug("vLLM's CPU logits LoRA maps rows correctly: no prompt-logprobs patch needed")
        return False
    setattr(runner, _METHOD, fixed_prompt_logprobs(original))
    logger.info("patched GPUModelRunner.%s: LoRA slot per prompt-logprobs row (CPU)", _METHOD)
    return True


def is_active() -> bool:
    """True when the runner's prompt-logprobs method is the fixed one in this process."""
    module = sys.modules.get(RUNNER_MODULE)
    runner = getattr(module, "GPUModelRunner", None)
    return bool(getattr(getattr(runner, _METHOD, None), _FIXED_MARK, False))


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Calls ``callback(module)`` right after ``name`` is first imported (then removes itself)."""

    def __init__(self, name: str, callback: Callable[[ModuleType], object]) -> None:
        self.name = name
        self.callback = callback

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module
        callback = self.callback

        def exec_then_patch(module: ModuleType) -> None:
            exec_module(module)
            try:
                callback(module)
            except Exception:  # noqa: BLE001 - a plugin must never break vLLM's import
                logger.exception("prompt-logprobs LoRA fix: patch failed; vLLM runs unpatched")

        spec.loader.exec_module = exec_then_patch  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Patch the runner now if it is imported, else as soon as it is (post-import hook)."""
    module = sys.modules.get(RUNNER_MODULE)
    if module is not None:
        patch_runner(module)
        return
    if not any(isinstance(f, _PostImportHook) and f.name == RUNNER_MODULE for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportHook(RUNNER_MODULE, patch_runner))
