"""All of one linear layer's LoRA slices in one call: vLLM's ``PunicaWrapperCPU.add_lora_linear``, fused.

vLLM's CPU wrapper runs a linear layer's LoRA as one shrink and one expand op per output slice (q, k, v:
six ops; gate, up: four), and its V1 engine uses the prefill (``sgmv``) ops for every step. With a few
dozen rows the ops' fixed costs, not their arithmetic, set the time: on SmolLM2 that is 14 op calls
per decoder layer per step. Here, for batches of fewer than :data:`FUSED_MAX_ROWS` rows::

    H  = x @ [A_1; ...; A_n]ᵀ               every slot of every slice at once: [T, n·S·r] (float32, as vLLM)
    H *= scale · onehot(i_b) per row          a row keeps its own slot's r columns (index -1: none)
    y[:, slice k] += H[:, block k] @ B_kᵀ     one GEMM per slice against all S slots' B stacked [S·r, out_k]

Row b gets ``scale · x_b @ A_k[i_b]ᵀ @ B_k[i_b]ᵀ`` exactly as in vLLM's ops (shrink in float32, expand in
the output's dtype), and a row with index -1 gets ``+ 0``. The other slots' products are computed and
multiplied by zero: (S−1)/S of a small GEMM wasted, against ~10 fewer op calls per layer. Larger
batches (prefill) keep the per-slice ops of :mod:`serving.lora_ops`, which touch each row's slot only.

The stacked weights ([S·r, in] for A, transposed to [S·r, out] for B) are cached per layer and rebuilt
when vLLM writes a slot (the tensors' version counters; tensors without one, e.g. created under
``torch.inference_mode``, are restacked at every call). The slot one-hot is cached per step. Exactness
against vLLM's ops is in ``tests/test_lora_ops.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

FUSED_MAX_ROWS = 256  # batches with fewer rows take the fused path; larger ones (prefill) the per-slice ops


def stack_weights(lora_a: tuple[Any, ...], lora_b: tuple[Any, ...], dtype: Any) -> tuple[Any, list[Any]]:
    """``(Aᵀ, [B_1, ..., B_n])``: Aᵀ = every slice's and slot's A rows stacked and transposed, [in, n·S·r]
    float32; B_k = slice k's B of every slot stacked along the rank, [S·r, out_k] in ``dtype``. Pure."""
    import torch

    a = torch.cat([w.reshape(-1, w.shape[-1]) for w in lora_a]).to(torch.float32)  # [S,1,r,in] -> [n·S·r, in]
    bs = []
    for w in lora_b:
        w = w.squeeze(1) if w.dim() == 4 else w  # [S, out, r]
        bs.append(w.transpose(1, 2).reshape(-1, w.shape[1]).to(dtype).contiguous())  # [S·r, out]
    return a.T.contiguous(), bs


def slot_mask(indices: Any, slots: int, rank: int, slices: int, scale: float) -> Any | None:
    """[T, slices·S·r] float32: ``scale`` in the r columns of each row's own slot, in every slice's block, 0
    elsewhere (index -1: a zero row); None when no row has a slot. Pure."""
    import torch

    if not bool((indices >= 0).any()):
        return None
    onehot = (indices.unsqueeze(1) == torch.arange(slots, device=indices.device)).to(torch.float32)  # [T, S]
    if scale != 1.0:
        onehot *= scale
    rows = indices.shape[0]
    return onehot.view(rows, 1, slots, 1).expand(rows, slices, slots, rank).reshape(rows, slices * slots * rank)


def fused_lora_linear(y: Any, x: Any, a_t: Any, bs: list[Any], mask: Any, output_slices: tuple[int, ...]) -> None:
    """``y[:, slice k] += scale · (x @ A_k[i_b]ᵀ) @ B_k[i_b]ᵀ`` per row, from :func:`stack_weights` and
    :func:`slot_mask` (which carries the scale). ``y`` [T, Σ out_k] is written in place. Pure tensor function."""
    h = (x if x.dtype == a_t.dtype else x.to(a_t.dtype)) @ a_t  # [T, n·S·r], float32 as vLLM's shrink
    h.mul_(mask)
    if h.dtype != y.dtype:
        h = h.to(y.dtype)
    width = bs[0].shape[0]
    if len(bs) == 1:
        y.addmm_(h, bs[0])
        return
    offset = 0
    for k, size in enumerate(output_slices):
        y[:, offset:offset + size].addmm_(h[:, k * width:(k + 1) * width], bs[k])
        offset += size


def make_add_lora_linear(original: Callable[..., None]) -> Callable[..., None]:
    """A replacement for ``PunicaWrapperCPU.add_lora_linear`` that takes the fused path for batches of
    fewer than :data:`FUSED_MAX_ROWS` rows and calls ``original`` otherwise (and whenever the shapes are
    not the ones it knows: the per-token indices not one per row, weights not 4-d)."""

    def add_lora_linear(self: Any, y: Any, x: Any, lora_a_stacked: tuple[Any, ...],
                        lora_b_stacked: tuple[Any, ...], scale: float, output_slices: tuple[int, ...],
                        *, buffer: Any = None, **kwargs: Any) -> None:
        x2 = x.view(-1, x.shape[-1])
        rows = x2.shape[0]
        a0 = lora_a_stacked[0]
        if not 0 < rows < FUSED_MAX_ROWS or a0.dim() != 4 or len(lora_a_stacked) != len(output_slices):
            original(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs)
            return
        mask = _step_mask(self, rows, a0.shape[0], a0.shape[2], len(output_slices), scale)
        if mask is False:  # indices not one per row
            original(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs)
            return
        if mask is None:  # no row has an adapter: nothing to add
            return
        y2 = y.view(-1, y.shape[-1])
        a_t, bs = _stacked(self, lora_a_stacked, lora_b_stacked, y2.dtype)
        fused_lora_linear(y2, x2, a_t, bs, mask, output_slices)

    return add_lora_linear


def _version(t: Any) -> int | None:
    try:
        return int(t._version)
    except RuntimeError:  # an inference tensor: no version counter
        return None


def _step_mask(wrapper: Any, rows: int, slots: int, rank: int, slices: int, scale: float) -> Any:
    """The step's :func:`slot_mask`, cached on the wrapper until vLLM rewrites the indices (once per step);
    ``False`` when the indices are not one per row."""
    cache = wrapper.__dict__.setdefault("_pissa_masks", {})
    base = wrapper.__dict__.get("_token_lora_indices")
    lengths = wrapper.__dict__.get("indices_len")
    version = _version(base) if base is not None and lengths else None
    if version is not None:  # vLLM's buffer and its length: no need to slice it (the property costs ~10 µs)
        step = (id(base), version, lengths[0])
        if cache.get("step") != step:
            cache.clear()
            cache["step"] = step
            cache["indices"] = base[:lengths[0]]
        indices = cache["indices"]
    else:  # not vLLM's wrapper as we know it: compare the indices themselves
        indices = wrapper.token_lora_indices
        last = cache.get("indices")
        if last is None or last.shape != indices.shape or not bool((last == indices).all()):
            cache.clear()
            cache["indices"] = indices.clone()
    if indices.numel() != rows:
        return False
    key = (slots, rank, slices, scale)
    if key not in cache:
        cache[key] = slot_mask(indices, slots, rank, slices, scale)
    return cache[key]


def _stacked(wrapper: Any, lora_a: tuple[Any, ...], lora_b: tuple[Any, ...], dtype: Any) -> tuple[Any, list[Any]]:
    """:func:`stack_weights` of one layer, cached on the wrapper until vLLM writes a slot (version counters;
    weights without one, created under ``torch.inference_mode``, are stacked at every call)."""
    versions = []
    for t in (*lora_a, *lora_b):
        v = _version(t)
        if v is None:
            return stack_weights(lora_a, lora_b, dtype)
        versions.append(v)
    cache = wrapper.__dict__.setdefault("_pissa_weights", {})
    hit = cache.get(id(lora_a))
    if hit is not None and hit[0] is lora_a and hit[1] is lora_b and hit[2] == versions and hit[3] == dtype:
        return hit[4]
    stacked = stack_weights(lora_a, lora_b, dtype)
    cache[id(lora_a)] = (lora_a, lora_b, versions, dtype, stacked)  # holds lora_a: its id stays unique
    return stacked


def make_add_lora_logits(original: Callable[..., None]) -> Callable[..., None]:
    """A replacement for ``PunicaWrapperCPU.add_lora_logits`` that adds nothing, without computing it, while
    every slot's logits B is zero (no loaded adapter trains ``lm_head``: vLLM zeroes the slot), and calls
    ``original`` otherwise. Adding ``x @ Aᵀ @ 0`` is adding zeros; skipping it saves two vocabulary-wide ops
    per step (on SmolLM2 [T, 8] @ [8, 49152] per slot)."""

    def add_lora_logits(self: Any, y: Any, x: Any, lora_a_stacked: Any, lora_b_stacked: Any, scale: float,
                        *, buffer: Any = None, **kwargs: Any) -> None:
        if not _any_nonzero(self, lora_b_stacked):
            return
        original(self, y, x, lora_a_stacked, lora_b_stacked, scale, buffer=buffer, **kwargs)

    return add_lora_logits


def _any_nonzero(wrapper: Any, weights: Any) -> bool:
    """``bool(weights.any())``, cached on the wrapper until the tensor is written (its version counter)."""
    version = _version(weights)
    if version is None:
        return bool(weights.any())
    cache = wrapper.__dict__.setdefault("_pissa_nonzero", {})
    hit = cache.get(id(weights))
    if hit is not None and hit[0] is weights and hit[1] == version:
        return bool(hit[2])
    nonzero = bool(weights.any())
    cache[id(weights)] = (weights, version, nonzero)
    return nonzero
