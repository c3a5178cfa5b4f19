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


def _version(t: Any) -> int | None:
    try:
        return int(t._version)
    except RuntimeError:  # an inference tensor: no version counter
        return None


def _key(tensors: tuple[Any, ...]) -> tuple[Any, ...] | None:
    key = []
    for t in tensors:
        v = _version(t)
        if v is None:
            return None
        key.append((t.data_ptr(), v, tuple(t.shape), t.dtype))
    return tuple(key)


def stack_weights(lora_a: tuple[Any, ...], lora_b: tuple[Any, ...], dtype: Any) -> tuple[Any, list[Any]]:
    """``(A, [B_1, ..., B_n])``: A = every slice's and slot's A rows stacked, [n·S·r, in] float32; B_k =
    slice k's B of every slot stacked along the rank, [S·r, out_k] in ``dtype``. Pure."""
    import torch

    a = torch.cat([w.reshape(-1, w.shape[-1]) for w in lora_a]).to(torch.float32)  # [S,1,r,in] -> [S·r, in]
    bs = []
    for w in lora_b:
        w = w.squeeze(1) if w.dim() == 4 else w  # [S, out, r]
        bs.append(w.transpose(1, 2).reshape(-1, w.shape[1]).to(dtype).contiguous())  # [S·r, out]
    return a, bs


def slot_mask(indices: Any, slots: int) -> Any | None:
    """[T, S] float32 one-hot of each row's slot (index -1: a zero row); None when no row has a slot. Pure."""
    import torch

    if not bool((indices >= 0).any()):
        return None
    return (indices.unsqueeze(1) == torch.arange(slots, device=indices.device)).to(torch.float32)


def fused_lora_linear(y: Any, x: Any, a: Any, bs: list[Any], mask: Any, scale: float,
                      output_slices: tuple[int, ...], rank: int) -> None:
    """``y[:, slice k] += scale · (x @ A_k[i_b]ᵀ) @ B_k[i_b]ᵀ`` per row, from :func:`stack_weights` and
    :func:`slot_mask`. ``y`` is written in place. Pure tensor function."""
    rows, slots = mask.shape
    n = len(output_slices)
    h = x.to(a.dtype) @ a.T  # [T, n·S·r]
    weights = mask if scale == 1.0 else mask * scale
    h = (h.view(rows, n, slots, rank) * weights.view(rows, 1, slots, 1)).view(rows, n * slots * rank)
    h = h.to(y.dtype)
    offset, width = 0, slots * rank
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
        indices = self.token_lora_indices
        if (not 0 < rows < FUSED_MAX_ROWS or indices.numel() != rows or lora_a_stacked[0].dim() != 4
                or len(lora_a_stacked) != len(output_slices)):
            original(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs)
            return
        slots, rank = lora_a_stacked[0].shape[0], lora_a_stacked[0].shape[2]
        mask = _cached_mask(self, indices, slots)
        if mask is None:  # no row has an adapter: nothing to add
            return
        y2 = y.view(-1, y.shape[-1])
        a, bs = _cached_weights(self, lora_a_stacked, lora_b_stacked, y2.dtype)
        fused_lora_linear(y2, x2, a, bs, mask, scale, output_slices, rank)

    return add_lora_linear


def _cached_mask(wrapper: Any, indices: Any, slots: int) -> Any | None:
    cache = wrapper.__dict__.setdefault("_pissa_mask", {})
    key = _key((indices,))
    if key is not None:
        key = (key, slots)
        if cache.get("key") == key:
            return cache["mask"]
    elif cache.get("indices") is not None and cache["slots"] == slots and cache["indices"].shape == indices.shape \
            and bool((cache["indices"] == indices).all()):
        return cache["mask"]
    mask = slot_mask(indices, slots)
    cache.update(key=key, mask=mask, indices=indices.clone() if key is None else None, slots=slots)
    return mask


def _cached_weights(wrapper: Any, lora_a: tuple[Any, ...], lora_b: tuple[Any, ...], dtype: Any) -> tuple[Any, list[Any]]:
    key = _key((*lora_a, *lora_b))
    if key is None:
        return stack_weights(lora_a, lora_b, dtype)
    cache = wrapper.__dict__.setdefault("_pissa_weights", {})
    slot = (lora_a[0].data_ptr(), dtype)
    hit = cache.get(slot)
    if hit is not None and hit[0] == key:
        return hit[1]
    stacked = stack_weights(lora_a, lora_b, dtype)
    cache[slot] = (key, stacked)
    return stacked
