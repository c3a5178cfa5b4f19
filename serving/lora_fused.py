"""All of one linear layer's LoRA slices in one call: vLLM's ``PunicaWrapperCPU.add_lora_linear``, fused.

vLLM's CPU wrapper runs a linear layer's LoRA as one shrink and one expand op per output slice (q, k, v:
six ops; gate, up: four), and its V1 engine uses the prefill (``sgmv``) ops for every step, decode
included, with one run per stretch of equal consecutive slot indices: with requests of several adapters
interleaved, one GEMM per row. With a few dozen rows the calls' fixed costs, not their arithmetic, set
the time. Here, for batches of fewer than :data:`FUSED_MAX_ROWS` rows, with ``lo:hi`` the range of slots
the step's rows use (slots outside it are not read)::

    H  = x @ A[lo:hi]ᵀ                      every used slot of every slice at once: [T, S'·n·r], float32
    H *= scale · onehot(i_b) per row          a row keeps its own slot's r columns (index -1: none)
    y[:, slice k] += H[:, slice k] @ B_k[lo:hi]   against the slots' B stacked [S'·r, out_k] (all slices in one
                                              GEMM on packed matrices, see below; one per slice in torch)

Row b gets ``scale · x_b @ A_k[i_b]ᵀ @ B_k[i_b]ᵀ`` as in vLLM's ops (shrink in float32, expand in the
output's dtype; in bf16 the masked path with torch's GEMMs rounds the sum once where vLLM, the packed
GEMMs and the grouped path below round twice, so results differ by up to one bf16 step), and a row with index -1 gets exactly nothing. The other used slots' products are
computed and multiplied by zero: (S'−1)/S' of two small GEMMs wasted, against 2n−3 fewer calls and no
per-run call at all. When every row has the same slot, no mask is needed. When the range is
:data:`GROUPED_MIN_SLOTS` slots wide or more, that waste costs more than grouping: the rows are gathered
by slot into a zero-padded block ``[S', t_max, in]`` (t_max: the most rows of one slot) and each group
multiplied by its own slot's A and B only (batched GEMMs, the same number of GEMM calls plus a gather, a
join of the slices and one add; ``bench/lora_grouping.py``, a SmolLM2 layer, 32 rows spread evenly, one
thread: 0.56× the masked call's time at 16 slots, 0.70× at 10, 1.12× at 4). The padding is the catch: one
busy slot among idle ones makes the block mostly zeros, many times slower than masking, so a step whose
block would exceed :data:`GROUPED_MAX_PADDING` times its rows is masked, and so is a layer whose joined
output would exceed :data:`GROUPED_MAX_ELEMENTS`. Larger batches (prefill) keep
the per-slice ops of :mod:`serving.lora_ops`, which touch each row's slot only.

Where vLLM has its oneDNN GEMM (``create_onednn_mm`` / ``onednn_mm``: what its own CPU linear layers run),
the masked path's two GEMMs run on packed matrices instead (:func:`packed_lora_linear`): the slots' A rows,
and every slice's B as one block-diagonal matrix (:func:`expand_weight`: its zero blocks cost flops and
bytes, but one expand call replaces n; its result is rounded to the output's dtype before it is added, as
vLLM does). Over a stand-in of SmolLM2's 30 layers with their base GEMMs in between, 32 rows over 4 slots,
two threads (``bench/lora_step.py``), the LoRA work per step measured 8.0–12.4 ms against 10.8–20.8 ms with
torch's GEMMs (four runs). A layer keeps the packed matrices of its :data:`PACKED_RANGES` most recently used
slot ranges: per slot, the A rows and n× the B columns (SmolLM2, rank 8, 4 slots: ~1.9 MB per layer in fp32).
``PISSA_LORA_ONEDNN=0`` keeps torch's GEMMs.

The stacked weights (slot-major, so that a slot range is one block) are a copy of vLLM's LoRA weights,
kept per layer on the wrapper and rebuilt when vLLM writes a slot (the tensors' version counters, compared
at every call; tensors without one, created under ``torch.inference_mode``, are stacked at every call).
The slot range, masks and row groups are computed once per step. :func:`make_add_lora_logits` skips the logits LoRA
while no slot has an ``lm_head`` adapter. Exactness: ``tests/test_lora_fused.py``; speed:
``bench/lora_ops.py`` (per layer) and ``bench/serve.py`` (end to end).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

FUSED_MAX_ROWS = 256  # batches with fewer rows take the fused path; larger ones (prefill) the per-slice ops
GROUPED_MIN_SLOTS = 10  # a slot range this wide groups the rows by slot instead of masking (bench/lora_grouping.py)
GROUPED_MAX_PADDING = 3  # ... unless the padded block would hold more than this many times the rows with a slot
GROUPED_MAX_ELEMENTS = 2**18  # ... or its joined output [block rows, Σ out] more elements (1 MiB in float32)
PACKED_RANGES = 4  # slot ranges whose packed matrices a layer keeps (the least recently used goes first)
ONEDNN_CACHED_SHAPES = 64  # vLLM's oneDNN primitive cache size asked for (a primitive per row count, per shape)
USE_ONEDNN = os.environ.get("PISSA_LORA_ONEDNN", "1") != "0"  # PISSA_LORA_ONEDNN=0: torch's GEMMs (a comparison run)


def stack_weights(lora_a: tuple[Any, ...], lora_b: tuple[Any, ...], dtype: Any) -> tuple[Any, list[Any]]:
    """``(A, [B_1, ..., B_n])``, slot-major so that a range of slots is a contiguous block: A = every slot's
    A rows of every slice, [S·n·r, in] float32 (row ``(s·n + k)·r + j``: slot s, slice k); B_k = slice k's B of
    every slot stacked along the rank, [S·r, out_k] in ``dtype``. Pure."""
    import torch

    slots, rank = lora_a[0].shape[0], lora_a[0].shape[-2]
    a = torch.stack([w.reshape(slots, rank, w.shape[-1]) for w in lora_a], 1)  # [S, n, r, in]
    a = a.reshape(-1, a.shape[-1]).to(torch.float32).contiguous()
    bs = []
    for w in lora_b:
        w = w.squeeze(1) if w.dim() == 4 else w  # [S, out, r]
        bs.append(w.transpose(1, 2).reshape(-1, w.shape[1]).to(dtype).contiguous())  # [S·r, out]
    return a, bs


class StepSlots:
    """The slots one step's rows use: the range ``lo:hi`` of slots holding every row's slot (slots outside
    it are not read at all), and per shape the row mask (:meth:`mask`). ``hi == lo`` when no row has one."""

    def __init__(self, indices: Any):
        self.indices = indices
        used = indices[indices >= 0]
        self.lo = int(used.min()) if used.numel() else 0
        self.hi = int(used.max()) + 1 if used.numel() else 0
        self.uniform = used.numel() == indices.numel() and self.hi - self.lo == 1  # one slot, every row
        self._masks: dict[tuple[int, int, float], Any] = {}
        self._groups: Any = False  # not computed yet

    def groups(self) -> tuple[Any, Any, int] | None:
        """:func:`row_groups` when the range is at least :data:`GROUPED_MIN_SLOTS` wide and its padded block holds
        at most :data:`GROUPED_MAX_PADDING` times the rows with a slot, else None (masking is faster for a few
        slots, and for one busy slot among idle ones, where the block would be mostly padding); computed once
        per step."""
        if self._groups is False:
            groups = row_groups(self.indices, self.lo, self.hi) if self.hi - self.lo >= GROUPED_MIN_SLOTS else None
            if groups is not None and (self.hi - self.lo) * groups[2] > GROUPED_MAX_PADDING * groups[0].numel():
                groups = None
            self._groups = groups
        return self._groups  # type: ignore[no-any-return]

    def groups_for(self, output_slices: tuple[int, ...]) -> tuple[Any, Any, int] | None:
        """:meth:`groups` for a layer with these output slices, or None when its joined output would exceed
        :data:`GROUPED_MAX_ELEMENTS` (temporaries of a MiB and more are allocated afresh at every call, which
        measured erratically slow)."""
        groups = self.groups()
        if groups is None or (self.hi - self.lo) * groups[2] * sum(output_slices) > GROUPED_MAX_ELEMENTS:
            return None
        return groups

    def mask(self, slices: int, rank: int, scale: float) -> Any | None:
        """[T, (hi−lo)·slices·r] float32: ``scale`` in the columns of each row's own slot (every slice), 0
        elsewhere (index -1: a zero row); None when every row has the same slot and ``scale`` is 1."""
        if self.uniform and scale == 1.0:
            return None
        key = (slices, rank, scale)
        if key not in self._masks:
            self._masks[key] = slot_mask(self.indices, self.lo, self.hi, slices, rank, scale)
        return self._masks[key]


def slot_mask(indices: Any, lo: int, hi: int, slices: int, rank: int, scale: float) -> Any:
    """[T, (hi−lo)·slices·r] float32 for slot-major columns ``((s−lo)·slices + k)·r + j``: ``scale`` where s
    is the row's slot, 0 elsewhere (index -1: a zero row). Pure."""
    import torch

    onehot = (indices.unsqueeze(1) == torch.arange(lo, hi, device=indices.device)).to(torch.float32)  # [T, S']
    if scale != 1.0:
        onehot *= scale
    rows, width = indices.shape[0], hi - lo
    return onehot.view(rows, width, 1, 1).expand(rows, width, slices, rank).reshape(rows, width * slices * rank)


def row_groups(indices: Any, lo: int, hi: int) -> tuple[Any, Any, int]:
    """``(rows, positions, t_max)``: the rows that have a slot (all in ``lo:hi``), sorted by slot, and each one's
    row in a zero-padded block of ``hi−lo`` groups of ``t_max`` rows (group ``s−lo`` holds slot s's rows; t_max
    the most rows of one slot). At least one row must have a slot. Pure."""
    import torch

    rows = torch.nonzero(indices >= 0).squeeze(1)
    slot = indices[rows] - lo
    counts = torch.bincount(slot, minlength=hi - lo)
    t_max = int(counts.max())
    order = torch.argsort(slot, stable=True)
    rows, slot = rows[order], slot[order]
    first = torch.cumsum(counts, 0) - counts
    positions = slot * t_max + (torch.arange(rows.numel(), device=rows.device) - first[slot])
    return rows, positions, t_max


def grouped_lora_linear(y: Any, x: Any, a: Any, bs: list[Any], lo: int, hi: int, groups: tuple[Any, Any, int],
                        scale: float, output_slices: tuple[int, ...], r: int) -> None:
    """:func:`fused_lora_linear` with the rows grouped by slot (``groups`` from :func:`row_groups`) instead of
    masked: each group is multiplied by its own slot's weights only (batched GEMMs over the ``hi−lo`` groups),
    then added to its rows. ``y`` [T, Σ out_k] is written in place; rows without a slot are not touched. In
    bf16 the expand's result is rounded before it is added, as vLLM does (the masked path rounds once). Pure
    tensor function."""
    import torch

    rows, positions, t_max = groups
    n, width = len(output_slices), hi - lo
    xf = x if x.dtype == a.dtype else x.to(a.dtype)
    padded = xf.new_zeros(width * t_max, xf.shape[1])
    padded.index_copy_(0, positions, xf.index_select(0, rows))
    a3 = a[lo * n * r:hi * n * r].view(width, n * r, -1).transpose(1, 2)  # [S', in, n·r]
    h = torch.bmm(padded.view(width, t_max, -1), a3)  # [S', t_max, n·r], float32
    if scale != 1.0:
        h.mul_(scale)
    if h.dtype != y.dtype:
        h = h.to(y.dtype)
    hv = h.view(width, t_max, n, r)
    outs = [torch.bmm(hv[:, :, k], bs[k][lo * r:hi * r].view(width, r, size)) for k, size in enumerate(output_slices)]
    out = (torch.cat(outs, dim=-1) if n > 1 else outs[0]).view(width * t_max, -1)  # [S'·t_max, Σ out_k]
    y.index_add_(0, rows, out.index_select(0, positions))


def expand_weight(bs: list[Any], lo: int, hi: int, r: int, output_slices: tuple[int, ...]) -> Any:
    """Every slice's B for slots ``lo:hi`` as one block-diagonal matrix in nn.Linear layout, [Σ out_k, S'·n·r]:
    column ``((s−lo)·n + k)·r + j`` (the shrink's slot-major column) holds slot s's B_k column j in slice k's
    rows and zeros in the other slices' rows, so ``y += H @ Wᵀ`` adds every slice at once. Pure."""
    import torch

    n, width = len(output_slices), hi - lo
    w = torch.zeros(sum(output_slices), width * n * r, dtype=bs[0].dtype, device=bs[0].device)
    offset = 0
    for k, size in enumerate(output_slices):
        block = bs[k][lo * r:hi * r].view(width, r, size)  # rows s·r + j of [S·r, out_k]
        w[offset:offset + size].view(size, width, n, r)[:, :, k, :].copy_(block.permute(2, 0, 1))
        offset += size
    return w


class PackedMatmul:
    """``x @ wᵀ`` for a fixed ``w`` [N, K] (nn.Linear layout) by vLLM's oneDNN GEMM, what vLLM's CPU linear layers
    run: ``create_onednn_mm`` packs a copy of ``w`` (vLLM then drops its own weight; so does this class) and
    ``onednn_mm`` multiplies by it. The first multiplication with a new row count makes oneDNN a primitive
    (~0.4–1 ms measured), which vLLM caches per (N, K). ``ok`` is False when there is no such GEMM or it refused
    the matrix; then this class keeps ``w`` and uses ``torch.nn.functional.linear``."""

    def __init__(self, w: Any):
        self.out_features: int = w.shape[0]
        self.dtype: Any = w.dtype
        self.handler: Any = None  # vLLM's CPUDNNLGEMMHandler: its packed copy of w lives as long as it does
        self.ops: Any = onednn_ops()
        ops = self.ops
        if ops is not None and w.device.type == "cpu":
            try:
                self.handler = ops.create_onednn_mm(w.contiguous().t(), ONEDNN_CACHED_SHAPES)
            except RuntimeError:  # a dtype or CPU oneDNN does not take
                self.handler = None
        self.ok = self.handler is not None
        self.w: Any = None if self.ok else w.contiguous()

    def __call__(self, x: Any) -> Any:
        if not self.ok:
            import torch

            return torch.nn.functional.linear(x, self.w)
        return self.ops.onednn_mm(self.handler, x.contiguous(), None)


def onednn_ops() -> Any | None:
    """vLLM's ``_custom_ops`` if :data:`USE_ONEDNN` and vLLM was built with its oneDNN GEMM (and this is not a
    POWER CPU, which vLLM excludes too), else None."""
    return _onednn_module() if USE_ONEDNN else None


@functools.cache
def _onednn_module() -> Any | None:
    import importlib
    import platform

    if platform.machine().lower().startswith(("ppc", "powerpc")):
        return None
    try:
        found = importlib.import_module("vllm._custom_ops")
    except ImportError:
        return None
    return found if getattr(found, "_supports_onednn", False) else None


def packed_lora_linear(y: Any, x: Any, shrink: PackedMatmul, expand: PackedMatmul, mask: Any | None,
                       scale: float) -> None:
    """:func:`fused_lora_linear` with both GEMMs on packed matrices: ``shrink`` over the slots' A rows
    ([S'·n·r, in] float32, as :func:`stack_weights` orders them) and ``expand`` over :func:`expand_weight` (in
    ``y``'s dtype). The expand multiplies the zero blocks too (n× its flops, one call instead of n) and its
    result is rounded to ``y``'s dtype before it is added, as vLLM's ops do. ``y`` is written in place; a row
    whose mask is zero gets exactly nothing. Pure tensor function."""
    h = shrink(x if x.dtype == shrink.dtype else x.to(shrink.dtype))  # [T, S'·n·r], float32
    y.add_(expand(_rows_own_slot(h, mask, scale, y.dtype)))


def _rows_own_slot(h: Any, mask: Any | None, scale: float, dtype: Any) -> Any:
    """The shrink's result ``h`` with each row's own slot kept and scaled (``mask``; None: scale only), in the
    expand's ``dtype`` (in place where it can)."""
    if mask is not None:
        h.mul_(mask)
    elif scale != 1.0:
        h.mul_(scale)
    return h if h.dtype == dtype else h.to(dtype)


def fused_lora_linear(y: Any, x: Any, a: Any, bs: list[Any], lo: int, hi: int, mask: Any | None, scale: float,
                      output_slices: tuple[int, ...], r: int) -> None:
    """``y[:, slice k] += scale · (x @ A_k[i_b]ᵀ) @ B_k[i_b]ᵀ`` per row, from :func:`stack_weights`, for
    rows whose slots lie in ``lo:hi`` and ``mask`` from :meth:`StepSlots.mask` (None: every row has slot
    ``lo``; ``scale`` is then applied here); ``r`` is the rank. ``y`` [T, Σ out_k] is written in place. Pure
    tensor function."""
    n = len(output_slices)
    h = (x if x.dtype == a.dtype else x.to(a.dtype)) @ a[lo * n * r:hi * n * r].T  # [T, S'·n·r], float32
    h = _rows_own_slot(h, mask, scale, y.dtype)
    rows, width = h.shape[0], hi - lo
    hv = h.view(rows, width, n, r)  # slot-major columns; with one slice, hv[:, :, 0] is h itself
    offset = 0
    for k, size in enumerate(output_slices):
        y[:, offset:offset + size].addmm_(hv[:, :, k].reshape(rows, width * r), bs[k][lo * r:hi * r])
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
        step = _step(self) if 0 < rows < FUSED_MAX_ROWS and a0.dim() == 4 and \
            len(lora_a_stacked) == len(output_slices) else None
        if step is None or step.indices.numel() != rows:
            original(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs)
            return
        if step.hi == step.lo:  # no row has an adapter: nothing to add
            return
        y2 = y.view(-1, y.shape[-1])
        layer = _layer(self, lora_a_stacked, lora_b_stacked, y2.dtype)
        r = a0.shape[2]
        groups = step.groups_for(output_slices)
        if groups is not None:
            grouped_lora_linear(y2, x2, layer.a, layer.bs, step.lo, step.hi, groups, scale, output_slices, r)
            return
        mask = step.mask(len(output_slices), r, scale)
        packed = layer.packed_for(step.lo, step.hi, output_slices, r)
        if packed is not None:
            packed_lora_linear(y2, x2, *packed, mask, scale)
            return
        fused_lora_linear(y2, x2, layer.a, layer.bs, step.lo, step.hi, mask, scale, output_slices, r)

    return add_lora_linear


def _version(t: Any) -> int | None:
    try:
        return int(t._version)
    except RuntimeError:  # an inference tensor: no version counter
        return None


def _step(wrapper: Any) -> StepSlots:
    """The step's :class:`StepSlots`, cached on the wrapper until vLLM rewrites the indices (``update_metadata``,
    whenever the batch's mapping or the slots change)."""
    cache = wrapper.__dict__.setdefault("_pissa_step", {})
    base = wrapper.__dict__.get("_token_lora_indices")
    lengths = wrapper.__dict__.get("indices_len")
    version = _version(base) if base is not None and lengths else None
    if version is not None:  # vLLM's buffer and its length: no need to slice it (the property costs ~10 µs)
        key = (id(base), version, lengths[0])
        if cache.get("key") != key:
            cache.update(key=key, step=StepSlots(base[:lengths[0]]))
        return cache["step"]
    return StepSlots(wrapper.token_lora_indices)  # not vLLM's wrapper as we know it: nothing cached


def _by_version(wrapper: Any, store: str, tensors: tuple[Any, ...], compute: Callable[[], Any],
                uncached: Callable[[], Any] | None = None) -> Any:
    """``compute()``, cached on the wrapper (``store``) until one of ``tensors`` is written: their identities
    and version counters are compared at every call (vLLM writes slots in place, and can load an adapter
    without rewriting the step's indices). Tensors without a counter, created under ``torch.inference_mode``,
    are not cached (``uncached()``, when given, computes their value instead)."""
    versions = []
    for t in tensors:
        v = _version(t)
        if v is None:
            return (uncached or compute)()
        versions.append(v)
    cache = wrapper.__dict__.setdefault(store, {})
    hit = cache.get(id(tensors[0]))
    if hit is not None and hit[1] == versions and all(a is b for a, b in zip(hit[0], tensors)):
        return hit[2]
    value = compute()
    cache[id(tensors[0])] = (tensors, versions, value)  # holds the tensors: their ids stay unique
    return value


class _Layer:
    """One layer's LoRA weights as the fused path uses them: :func:`stack_weights`' ``a`` and ``bs``, and the packed
    shrink and expand (:func:`packed_lora_linear`) of the last :data:`PACKED_RANGES` slot ranges, built on demand.
    ``packed`` is None when the layer is not cached (weights without a version counter are stacked at every call,
    and packing them at every call would cost more than it saves)."""

    __slots__ = ("a", "bs", "packed")

    def __init__(self, a: Any, bs: list[Any], cached: bool):
        self.a, self.bs = a, bs
        self.packed: dict[tuple[int, int], tuple[PackedMatmul, PackedMatmul] | None] | None = {} if cached else None

    def packed_for(self, lo: int, hi: int, output_slices: tuple[int, ...],
                   r: int) -> tuple[PackedMatmul, PackedMatmul] | None:
        """The packed shrink and expand for slots ``lo:hi`` (built on first use, then the most recently used), or
        None: not cached, no oneDNN GEMM, or oneDNN refused these matrices (remembered: torch's fused call)."""
        if self.packed is None or onednn_ops() is None:
            return None
        key = (lo, hi)
        if key in self.packed:
            pair = self.packed[key] = self.packed.pop(key)  # most recently used last
            return pair
        while len(self.packed) >= PACKED_RANGES:
            self.packed.pop(next(iter(self.packed)))
        n = len(output_slices)
        shrink = PackedMatmul(self.a[lo * n * r:hi * n * r])
        expand = PackedMatmul(expand_weight(self.bs, lo, hi, r, output_slices))
        pair = self.packed[key] = (shrink, expand) if shrink.ok and expand.ok else None
        return pair


def _layer(wrapper: Any, lora_a: tuple[Any, ...], lora_b: tuple[Any, ...], dtype: Any) -> _Layer:
    """The layer's :class:`_Layer`, cached until vLLM writes a slot (:func:`_by_version`)."""
    return _by_version(wrapper, f"_pissa_weights_{dtype}", (*lora_a, *lora_b),
                       lambda: _Layer(*stack_weights(lora_a, lora_b, dtype), cached=True),
                       uncached=lambda: _Layer(*stack_weights(lora_a, lora_b, dtype), cached=False))


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
    """``bool(weights.any())``, cached until the tensor is written (:func:`_by_version`)."""
    return bool(_by_version(wrapper, "_pissa_nonzero", (weights,), lambda: bool(weights.any())))
