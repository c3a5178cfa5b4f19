"""The fast CPU multi-LoRA ops (serving/lora_ops.py) against a per-row reference.

Reference, for each row b with slot i_b (computed row by row in float64, then cast):
    shrink  y_b = scaling · x_b @ A[i_b]ᵀ if i_b >= 0 else 0
    expand  y_b = y_b + x_b @ B[i_b]ᵀ (add) or x_b @ B[i_b]ᵀ (overwrite) if i_b >= 0 else y_b unchanged
Tolerances: fp32 1e-4 relative to the row's scale (GEMMs of different shapes sum in different orders);
bf16 weights and inputs with an fp32 output: 1e-4 too (the products are done in the output's dtype, as vLLM's
ops do); bf16 output: 2e-2 (bf16's 8-bit mantissa).
"""

from __future__ import annotations

import pytest
import torch

from serving import lora_ops

CASES = [  # rows, slots, rank, in, out
    (1, 1, 1, 16, 24), (1, 4, 8, 64, 96), (5, 3, 16, 32, 40), (8, 16, 8, 48, 64), (32, 4, 8, 64, 160),
    (64, 16, 64, 96, 48), (255, 2, 4, 32, 32), (256, 4, 8, 32, 32), (300, 7, 32, 40, 72),
]


def _indices(rows: int, slots: int, gen: torch.Generator, none_share: float = 0.25) -> torch.Tensor:
    idx = torch.randint(0, slots, (rows,), generator=gen)
    idx[torch.rand(rows, generator=gen) < none_share] = -1
    return idx


def ref_shrink(x, a, idx, scaling, dtype):
    out = torch.zeros(x.shape[0], a.shape[1], dtype=torch.float64)
    for b, i in enumerate(idx.tolist()):
        if i >= 0:
            out[b] = scaling * (x[b].to(dtype).double() @ a[i].to(dtype).double().T)
    return out


def ref_expand(x, bw, idx, y0, add, dtype, offset=0):
    out = y0.double().clone()
    size = bw.shape[1]
    for b, i in enumerate(idx.tolist()):
        if i >= 0:
            p = x[b].to(dtype).double() @ bw[i].to(dtype).double().T
            out[b, offset:offset + size] = (out[b, offset:offset + size] + p) if add else p
    return out


def tol(dtype: torch.dtype) -> float:
    return 2e-2 if dtype == torch.bfloat16 else 1e-4


@pytest.mark.parametrize("rows,slots,rank,d_in,d_out", CASES)
@pytest.mark.parametrize("wdtype,odtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                           (torch.bfloat16, torch.bfloat16)])
def test_bgmv_ops_equal_per_row_reference(rows, slots, rank, d_in, d_out, wdtype, odtype):
    gen = torch.Generator().manual_seed(rows * 1000 + slots * 10 + rank)
    idx = _indices(rows, slots, gen)
    x = torch.randn(rows, d_in, generator=gen).to(wdtype)
    a = torch.randn(slots, 1, rank, d_in, generator=gen).to(wdtype)  # vLLM's [S, 1, r, in]
    y = torch.full((rows, rank), 7.0, dtype=odtype)  # shrink overwrites every row (-1 rows with 0)
    lora_ops.bgmv_shrink(x, a, y, idx, 0.5)
    expected = ref_shrink(x, a[:, 0], idx, 0.5, odtype)
    assert torch.allclose(y.double(), expected, atol=tol(odtype) * (1 + expected.abs().max().item()), rtol=0)
    assert (y[idx < 0] == 0).all()

    h = torch.randn(rows, rank, generator=gen).to(wdtype)
    b = torch.randn(slots, 1, d_out, rank, generator=gen).to(wdtype)
    for add in (True, False):
        y0 = torch.randn(rows, d_out + 8, generator=gen).to(odtype)
        y1 = y0.clone()
        lora_ops.bgmv_expand_slice(h, b, y1, idx, 4, d_out, add)
        expected = ref_expand(h, b[:, 0], idx, y0, add, odtype, offset=4)
        assert torch.allclose(y1.double(), expected, atol=tol(odtype) * (1 + expected.abs().max().item()), rtol=0)
        assert torch.equal(y1[idx < 0], y0[idx < 0])  # no-adapter rows: untouched, bit for bit
        y2 = y0[:, :d_out].clone()
        lora_ops.bgmv_expand(h, b, y2, idx, add)
        expected = ref_expand(h, b[:, 0], idx, y0[:, :d_out], add, odtype)
        assert torch.allclose(y2.double(), expected, atol=tol(odtype) * (1 + expected.abs().max().item()), rtol=0)
        assert torch.equal(y2[idx < 0], y0[:, :d_out][idx < 0])


@pytest.mark.parametrize("lengths,seq_slots", [([5, 0, 3, 7], [1, 2, -1, 1]), ([16], [0]), ([4, 4, 4], [2, 2, 0]),
                                               ([9, 2], [-1, -1]), ([1] * 12, [0, 1, 2, 3, -1, 0, 1, 2, 3, -1, 3, 3]),
                                               ([5, 1, 1, 1, 3, 1], [0, 1, 0, 1, -1, 3])])
def test_sgmv_ops_equal_the_exploded_bgmv_reference(lengths, seq_slots):
    gen = torch.Generator().manual_seed(sum(lengths))
    slots, rank, d_in, d_out = 4, 8, 32, 48
    lens = torch.tensor(lengths)
    seq_idx = torch.tensor(seq_slots)
    starts = torch.cumsum(lens, 0) - lens
    rows = int(lens.sum())
    idx = torch.repeat_interleave(seq_idx, lens)  # what vLLM's sgmv does: one index per row
    x = torch.randn(rows, d_in, generator=gen)
    a = torch.randn(slots, 1, rank, d_in, generator=gen)
    y = torch.full((rows, rank), 3.0)
    lora_ops.sgmv_shrink(x, a, y, starts, lens, seq_idx, len(lengths), max(lengths), rows, 2.0)
    assert torch.allclose(y.double(), ref_shrink(x, a[:, 0], idx, 2.0, torch.float32), atol=1e-4)
    h = torch.randn(rows, rank, generator=gen)
    b = torch.randn(slots, 1, d_out, rank, generator=gen)
    for add in (True, False):
        y0 = torch.randn(rows, d_out + 4, generator=gen)
        y1 = y0.clone()
        lora_ops.sgmv_expand_slice(h, b, y1, starts, lens, seq_idx, len(lengths), max(lengths), rows, 2, d_out, add)
        assert torch.allclose(y1.double(), ref_expand(h, b[:, 0], idx, y0, add, torch.float32, offset=2), atol=1e-4)
        y2 = y0[:, :d_out].clone()
        lora_ops.sgmv_expand(h, b, y2, starts, lens, seq_idx, len(lengths), max(lengths), rows, add)
        assert torch.allclose(y2.double(), ref_expand(h, b[:, 0], idx, y0[:, :d_out], add, torch.float32), atol=1e-4)


def test_equal_to_vllms_ops_where_those_are_right():
    """With no -1 row, vLLM's own torch ops are correct: ours give the same numbers."""
    ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")
    gen = torch.Generator().manual_seed(3)
    for rows in (1, 8, 32, 300):
        idx = torch.randint(0, 4, (rows,), generator=gen)
        x, a = torch.randn(rows, 64, generator=gen), torch.randn(4, 1, 8, 64, generator=gen)
        mine, theirs = torch.zeros(rows, 8), torch.zeros(rows, 8)
        lora_ops.bgmv_shrink(x, a, mine, idx, 0.25)
        ops.bgmv_shrink(x, a, theirs, idx, 0.25)
        assert torch.allclose(mine, theirs, atol=1e-5)
        h, b = torch.randn(rows, 8, generator=gen), torch.randn(4, 1, 96, 8, generator=gen)
        y0 = torch.randn(rows, 96, generator=gen)
        mine, theirs = y0.clone(), y0.clone()
        lora_ops.bgmv_expand(h, b, mine, idx, True)
        ops.bgmv_expand(h, b, theirs, idx, True)
        assert torch.allclose(mine, theirs, atol=1e-5)


def test_single_row_broadcast_rule_of_vllms_expand():
    """vLLM's expand broadcasts a one-row product over every output row (kept, as vLLM's op does)."""
    ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")
    h, b = torch.randn(1, 4), torch.randn(2, 1, 6, 4)
    mine, theirs = torch.zeros(3, 6), torch.zeros(3, 6)
    lora_ops.bgmv_expand(h, b, mine, torch.tensor([1]), True)
    ops.bgmv_expand(h, b, theirs, torch.tensor([1]), True)
    assert torch.allclose(mine, theirs) and torch.allclose(mine[2], h[0] @ b[1, 0].T)


def test_a_single_index_or_row_broadcasts_like_vllms_ops():
    """vLLM's einsum broadcasts one index over many rows (logits of one request's prompt) and one row over
    many indices; the prompt-logprobs path relies on it."""
    ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")
    gen = torch.Generator().manual_seed(5)
    for rows, n_idx in ((7, 1), (1, 5), (40, 1)):
        x, a = torch.randn(rows, 32, generator=gen), torch.randn(3, 1, 8, 32, generator=gen)
        idx = torch.randint(0, 3, (n_idx,), generator=gen)
        out_rows = max(rows, n_idx)
        mine, theirs = torch.zeros(out_rows, 8), torch.zeros(out_rows, 8)
        lora_ops.bgmv_shrink(x, a, mine, idx, 0.5)
        ops.bgmv_shrink(x, a, theirs, idx, 0.5)
        assert torch.allclose(mine, theirs, atol=1e-5), (rows, n_idx)
        h, b = torch.randn(rows, 8, generator=gen), torch.randn(3, 1, 24, 8, generator=gen)
        y0 = torch.randn(out_rows, 24, generator=gen)
        mine, theirs = y0.clone(), y0.clone()
        lora_ops.bgmv_expand(h, b, mine, idx, True)
        ops.bgmv_expand(h, b, theirs, idx, True)
        assert torch.allclose(mine, theirs, atol=1e-5), (rows, n_idx)


def test_rows_and_indices_that_do_not_broadcast_raise_like_vllms_ops():
    ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")
    x, a, idx = torch.ones(6, 2), torch.ones(2, 1, 1, 2), torch.tensor([0, 1])
    with pytest.raises(RuntimeError):
        ops.bgmv_shrink(x, a, torch.zeros(6, 1), idx, 1.0)
    with pytest.raises(RuntimeError):
        lora_ops.bgmv_shrink(x, a, torch.zeros(6, 1), idx, 1.0)
