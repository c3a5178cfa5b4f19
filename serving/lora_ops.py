"""Fast multi-LoRA ops for vLLM's CPU backend: the ``bgmv_*`` (decode) and ``sgmv_*`` (prefill) ops of
``vllm/lora/ops/torch_ops/lora_ops.py``, same signatures, pure tensor functions.

For every row b with LoRA slot i_b (``-1``: no adapter)::

    shrink:  y_b       = [i_b >= 0] · scaling · x_b @ A[i_b]ᵀ     (A: [S, r, in]; -1 rows get 0)
    expand:  y_b (+)=  x_b @ B[i_b]ᵀ                  if i_b >= 0    (B: [S, out, r]; -1 rows untouched)

vLLM's own CPU ops gather each row's slot weights (``W[indices]``: a [T, out, in] copy per op) and run a
batched einsum; with index -1 that gather silently takes the LAST slot (:mod:`serving.vllm_plugin`).
Here no per-row copy of the weights is made:

* **stacked** (decode batches of 2–255 rows, shrink): one GEMM of the rows against every slot's A at
  once (``x @ A.view(S·r, in)ᵀ``, A is contiguous so the view is free), then each row keeps its own
  slot's r columns. It wastes (S−1)/S of a small GEMM, and wins while the per-slot launch cost dominates.
* **gathered** (tiny batches: rows·out·in ≤ :data:`GATHER_ELEMENTS`, e.g. an expand of ≤ 8 rows into 576
  outputs): each row's slot weights gathered and one batched product, like vLLM's op, with -1 rows masked;
  the copy is small there and one call beats one GEMM per slot.
* **grouped** (everything else): rows are grouped by slot and each group is one GEMM against its slot's
  weights (prefill rows come in runs of one sequence, so a group is a contiguous slice, no gather).

Rows whose index is -1 never touch any slot's weights. Exactness against a per-row reference is in
``tests/test_lora_ops.py``; speed in ``bench/lora_ops.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

STACKED_ROWS = (2, 256)  # decode batches with this many rows (lo <= T < hi) use the stacked GEMM
GATHER_ELEMENTS = 8 * 576 * 8  # below this many gathered weight elements (rows·out·in), gather + bmm is fastest


def _weights(w: Any) -> Any:
    """[S, 1, o, i] (vLLM's stacked layout) or [S, o, i] -> [S, o, i]."""
    return w.squeeze(1) if w.dim() == 4 else w


def _groups(indices: Any) -> list[tuple[int, Any]]:
    """(slot, row indices) for each slot in use (index -1 rows are in no group)."""
    import torch

    slots = torch.unique(indices).tolist()
    if len(slots) == 1:
        return [] if slots[0] < 0 else [(slots[0], None)]  # None: every row
    return [(s, (indices == s).nonzero().squeeze(1)) for s in slots if s >= 0]


def _runs(indices: Any, lengths: Any) -> list[tuple[int, int, int]]:
    """Prefill: (slot, first row, end row) for runs of consecutive sequences sharing a slot (slot >= 0).

    Rows are assigned to sequences in order, ``lengths[k]`` rows each (as vLLM's
    ``repeat_interleave(indices, lengths)``)."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for slot, length in zip(indices.tolist(), lengths.tolist()):
        length = int(length)
        if slot < 0 or length == 0:
            start += length
            continue
        if runs and runs[-1][0] == slot and runs[-1][2] == start:
            runs[-1] = (slot, runs[-1][1], start + length)
        else:
            runs.append((slot, start, start + length))
        start += length
    return runs


def _product(x: Any, w: Any, indices: Any, dtype: Any) -> tuple[Any, Any]:
    """``(P, mask)``: P[b] = x_b @ W[i_b]ᵀ for rows with i_b >= 0 and 0 for the others; mask = i_b >= 0
    (None when every row has a slot)."""
    import torch

    w = _weights(w)
    x = x.to(dtype)
    if indices.numel() != x.shape[0]:  # vLLM's einsum broadcasts a single index (or a single row) over the other
        if indices.numel() == 1:
            indices = indices.reshape(1).expand(x.shape[0])
        elif x.shape[0] == 1:
            x = x.expand(indices.numel(), -1)
        else:  # what vLLM's einsum raises too (serving/vllm_prompt_logprobs.py's probe relies on it)
            raise RuntimeError(f"{x.shape[0]} rows but {indices.numel()} LoRA indices")
    rows = x.shape[0]
    slots, out_dim, in_dim = w.shape
    valid = indices >= 0
    all_valid = bool(valid.all())
    if STACKED_ROWS[0] <= rows < STACKED_ROWS[1] and out_dim * slots <= 4 * in_dim:
        # stacked: every row against every slot, keep its own (only when S·out is small next to in: shrink)
        y = x @ w.reshape(slots * out_dim, in_dim).to(dtype).T
        y = y.view(rows, slots, out_dim)[torch.arange(rows), indices.clamp(min=0)]
        if not all_valid:
            y = torch.where(valid.unsqueeze(1), y, torch.zeros((), dtype=dtype))
        return y, None if all_valid else valid
    if STACKED_ROWS[0] <= rows < STACKED_ROWS[1] and in_dim * slots <= 4 * out_dim:
        # scattered (expand): row b's input placed in its slot's block of a [rows, S·in] matrix (zeros
        # elsewhere; -1 rows all zero), then one GEMM against every slot's weights stacked along `in`
        scattered = x.new_zeros(rows, slots, in_dim)
        scattered[torch.arange(rows), indices.clamp(min=0)] = x
        if not all_valid:
            scattered[~valid] = 0
        stacked = w.to(dtype).transpose(1, 2).reshape(slots * in_dim, out_dim)  # [S·in, out] (a small copy)
        return scattered.view(rows, slots * in_dim) @ stacked, None if all_valid else valid
    if rows * out_dim * in_dim <= GATHER_ELEMENTS:
        # tiny batches: one batched product over each row's own slot (the copy is small here)
        y = torch.bmm(w[indices.clamp(min=0)].to(dtype), x.unsqueeze(2)).squeeze(2)
        if not all_valid:
            y = torch.where(valid.unsqueeze(1), y, torch.zeros((), dtype=dtype))
        return y, None if all_valid else valid
    groups = _groups(indices)
    if len(groups) == 1 and groups[0][1] is None:
        return x @ w[groups[0][0]].to(dtype).T, None
    y = x.new_zeros(rows, out_dim)
    for slot, members in groups:
        y.index_copy_(0, members, x.index_select(0, members) @ w[slot].to(dtype).T)
    return y, None if all_valid else valid


def _write(output: Any, product: Any, valid: Any, columns: slice, add: bool) -> None:
    """``output[:, columns] (+)= product``; without ``add`` rows outside ``valid`` keep their values."""
    import torch

    if add:
        output[:, columns] += product
    elif valid is None:
        output[:, columns] = product
    else:
        output[:, columns] = torch.where(valid.unsqueeze(1), product, output[:, columns])


# --- decode (one index per row) ------------------------------------------------------------------
def bgmv_shrink(inputs: Any, lora_a_weights: Any, output_tensor: Any, lora_indices_tensor: Any,
                scaling: float = 1.0) -> None:
    """``output[b, :r] = scaling · x_b @ A[i_b]ᵀ``; 0 for rows with index -1."""
    y, _ = _product(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : y.shape[1]] = y * scaling if scaling != 1.0 else y


def bgmv_expand(inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any,
                add_inputs: bool = True) -> None:
    """``output[b] (+)= x_b @ B[i_b]ᵀ``; rows with index -1 unchanged (vLLM's padding rules kept)."""
    y, valid = _product(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = 1 if y.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    common = min(y.shape[1], output_tensor.shape[1])
    _write(output_tensor, y[:limit, :common], valid[:limit] if valid is not None else None, slice(0, common),
           add_inputs)


def bgmv_expand_slice(inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any,
                      slice_offset: int, slice_size: int, add_inputs: bool = True) -> None:
    """``output[b, off:off+size] (+)= x_b @ B[i_b]ᵀ``; rows with index -1 unchanged."""
    y, valid = _product(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    _write(output_tensor, y, valid, slice(slice_offset, slice_offset + slice_size), add_inputs)


# --- prefill (one index per sequence; rows of a sequence are contiguous) ------------------------
def _prefill_product(x: Any, w: Any, lengths: Any, indices: Any, dtype: Any, out_rows: int) -> tuple[Any, Any]:
    """``(P, mask)`` as :func:`_product`, with one index per sequence of ``lengths`` rows.

    vLLM's V1 engine calls the ``sgmv`` ops for every step, decode included, so a decode batch arrives as
    one-row sequences: when the sequences do not come in one run per slot (adapters interleaved), the rows
    get their own indices and :func:`_product` picks the decode strategy; otherwise each run is one GEMM on
    a contiguous slice."""
    import torch

    w = _weights(w)
    runs = _runs(indices, lengths)
    if len(runs) > len({slot for slot, _, _ in runs}):
        per_row = torch.full((out_rows,), -1, dtype=indices.dtype)
        covered = int(lengths.sum())
        per_row[:covered] = torch.repeat_interleave(indices, lengths)
        return _product(x, w, per_row, dtype)
    x = x.to(dtype)
    if len(runs) == 1 and runs[0][1] == 0 and runs[0][2] == out_rows:
        return x @ w[runs[0][0]].to(dtype).T, None
    y = x.new_zeros(out_rows, w.shape[1])
    valid = torch.zeros(out_rows, dtype=torch.bool)
    for slot, first, end in runs:
        y[first:end] = x[first:end] @ w[slot].to(dtype).T
        valid[first:end] = True
    return y, valid


def sgmv_shrink(inputs: Any, lora_a_weights: Any, output_tensor: Any, b_seq_start_loc: Any, seq_len_tensor: Any,
                lora_indices_tensor: Any, batches: int, max_seq_length: int, token_nums: int,
                scaling: float) -> None:
    """Prefill :func:`bgmv_shrink`: each sequence's rows with its slot."""
    y, _ = _prefill_product(inputs, lora_a_weights, seq_len_tensor, lora_indices_tensor,
                            output_tensor.dtype, inputs.shape[0])
    output_tensor[:, : y.shape[1]] = y * scaling if scaling != 1.0 else y


def sgmv_expand(inputs: Any, lora_b_weights: Any, output_tensor: Any, b_seq_start_loc: Any, seq_len_tensor: Any,
                lora_indices_tensor: Any, batches: int, max_seq_length: int, token_nums: int,
                add_inputs: bool = False) -> None:
    """Prefill :func:`bgmv_expand`."""
    y, valid = _prefill_product(inputs, lora_b_weights, seq_len_tensor, lora_indices_tensor,
                                output_tensor.dtype, inputs.shape[0])
    limit = 1 if y.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    common = min(y.shape[1], output_tensor.shape[1])
    _write(output_tensor, y[:limit, :common], valid[:limit] if valid is not None else None, slice(0, common),
           add_inputs)


def sgmv_expand_slice(inputs: Any, lora_b_weights: Any, output_tensor: Any, b_seq_start_loc: Any,
                      seq_len_tensor: Any, lora_indices_tensor: Any, batches: int, max_seq_length: int,
                      token_nums: int, slice_offset: int, slice_size: int, add_inputs: bool = False) -> None:
    """Prefill :func:`bgmv_expand_slice`."""
    y, valid = _prefill_product(inputs, lora_b_weights, seq_len_tensor, lora_indices_tensor,
                                output_tensor.dtype, inputs.shape[0])
    _write(output_tensor, y, valid, slice(slice_offset, slice_offset + slice_size), add_inputs)


FAST_OPS: dict[str, Callable[..., None]] = {
    "bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice,
    "sgmv_shrink": sgmv_shrink, "sgmv_expand": sgmv_expand, "sgmv_expand_slice": sgmv_expand_slice,
}
