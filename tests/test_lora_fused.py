"""The fused ``add_lora_linear`` (serving/lora_fused.py) against a per-row reference.

Reference, for each row b with slot i_b and each output slice k (row by row, float64):
    y_b[slice k] += scale · (x_b @ A_k[i_b]ᵀ) @ B_k[i_b]ᵀ   if i_b >= 0, else y_b unchanged (bit for bit).
Tolerances: fp32 1e-4 relative to the largest reference value of the case (GEMMs of different shapes sum in
different orders); bf16 inputs, weights and output: 2e-2 (bf16's 8-bit mantissa; vLLM also casts the float32
shrink result to bf16 before the expand).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from serving import lora_fused

CASES = [  # rows, slots, rank, d_in, slice sizes
    (1, 1, 1, 16, (24,)), (3, 4, 8, 64, (64, 16, 16)), (32, 4, 8, 64, (96, 32)), (17, 16, 8, 48, (48, 16, 16)),
    (64, 16, 64, 96, (40,)), (255, 2, 4, 32, (32, 32)), (8, 7, 32, 40, (72, 8, 8)), (5, 3, 16, 24, (24,)),
]


class Wrapper:
    """What the fused path reads from vLLM's ``PunicaWrapperCPU``: the per-token slot indices."""

    def __init__(self, indices: torch.Tensor):
        self.token_lora_indices = indices
        self.original_calls = 0


def original(wrapper, y, x, lora_a, lora_b, scale, output_slices, *, buffer=None, **kwargs):
    wrapper.original_calls += 1
    if wrapper.token_lora_indices.numel() != x.shape[0]:
        return  # a shape the fused path does not know: only the hand-over is checked
    y.copy_(reference(y, x, lora_a, lora_b, scale, output_slices, wrapper.token_lora_indices).to(y.dtype))


def reference(y, x, lora_a, lora_b, scale, output_slices, indices):
    out = y.double().clone()
    offset = 0
    for k, size in enumerate(output_slices):
        for b, i in enumerate(indices.tolist()):
            if i >= 0:
                a = lora_a[k][i, 0].double()  # [r, in]
                bw = lora_b[k][i, 0].double()  # [out_k, r]
                out[b, offset:offset + size] += scale * (x[b].double() @ a.T) @ bw.T
        offset += size
    return out


def make_case(rows, slots, rank, d_in, slices, dtype, seed, none_share=0.25):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, slots, (rows,), generator=gen)
    idx[torch.rand(rows, generator=gen) < none_share] = -1
    x = torch.randn(rows, d_in, generator=gen).to(dtype)
    lora_a = tuple(torch.randn(slots, 1, rank, d_in, generator=gen).to(dtype) for _ in slices)  # vLLM's layout
    lora_b = tuple(torch.randn(slots, 1, size, rank, generator=gen).to(dtype) for size in slices)
    y = torch.randn(rows, sum(slices), generator=gen).to(dtype)
    return idx, x, lora_a, lora_b, y


def fused():
    return lora_fused.make_add_lora_linear(original)


def packed_gemm_available() -> bool:
    """Whether the packed (oneDNN) path can run: it must wherever vLLM is installed (the plugin's CI), unless
    PISSA_LORA_ONEDNN=0 turned it off."""
    if importlib.util.find_spec("vllm") is None or not lora_fused.USE_ONEDNN:
        return False
    assert lora_fused.onednn_ops() is not None, "vLLM is installed but its oneDNN GEMM was not found"
    return True


@pytest.fixture(params=["packed", "torch"])
def gemm(request, monkeypatch):
    """Both GEMM back ends of the masked path: vLLM's oneDNN on packed matrices, and torch (``PISSA_LORA_ONEDNN=0``);
    yields the list the packed path appends to when it runs."""
    if request.param == "packed" and not packed_gemm_available():
        pytest.skip("vLLM (its oneDNN GEMM) is not installed")
    if request.param == "torch":
        monkeypatch.setattr(lora_fused, "USE_ONEDNN", False)
    taken: list[int] = []
    real = lora_fused.packed_lora_linear
    monkeypatch.setattr(lora_fused, "packed_lora_linear", lambda *a, **k: taken.append(1) or real(*a, **k))
    yield request.param, taken


@pytest.mark.parametrize("rows,slots,rank,d_in,slices", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_fused_equals_per_row_reference_and_rows_without_adapter_are_untouched(rows, slots, rank, d_in, slices,
                                                                                dtype, scale, gemm):
    idx, x, lora_a, lora_b, y = make_case(rows, slots, rank, d_in, slices, dtype, seed=rows * 100 + slots + rank)
    y0 = y.clone()
    wrapper = Wrapper(idx)
    fused()(wrapper, y, x, lora_a, lora_b, scale, slices)
    assert wrapper.original_calls == 0  # the fused path ran
    backend, taken = gemm
    grouped = (idx >= 0).any().item() and lora_fused.StepSlots(idx).groups_for(slices) is not None
    assert bool(taken) == (backend == "packed" and (idx >= 0).any().item() and not grouped)  # the chosen back end ran
    ref = reference(y0, x, lora_a, lora_b, scale, slices, idx)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    err = (y.double() - ref).abs().max().item() / ref.abs().max().item()
    assert err < tol, f"relative error {err:.2e} > {tol}"
    none = idx < 0
    assert torch.equal(y[none], y0[none])  # index -1: exactly nothing added


def test_a_batch_without_adapters_is_left_exactly_as_it_was():
    idx, x, lora_a, lora_b, y = make_case(6, 4, 8, 32, (32, 8), torch.float32, seed=1, none_share=1.0)
    y0 = y.clone()
    wrapper = Wrapper(idx)
    fused()(wrapper, y, x, lora_a, lora_b, 1.0, (32, 8))
    assert wrapper.original_calls == 0 and torch.equal(y, y0)


def test_a_3d_input_and_output_take_the_same_path():
    idx, x, lora_a, lora_b, y = make_case(12, 4, 8, 32, (16, 16), torch.float32, seed=2)
    ref = reference(y, x, lora_a, lora_b, 1.0, (16, 16), idx)
    y3 = y.clone().view(3, 4, 32)
    fused()(Wrapper(idx), y3, x.view(3, 4, 32), lora_a, lora_b, 1.0, (16, 16))
    assert torch.allclose(y3.view(12, 32).double(), ref, rtol=0, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("rows,n_indices", [(lora_fused.FUSED_MAX_ROWS, None), (600, None), (8, 9)])
def test_prefill_sized_batches_and_unknown_shapes_go_to_the_original(rows, n_indices):
    idx, x, lora_a, lora_b, y = make_case(rows, 4, 8, 16, (16,), torch.float32, seed=3)
    if n_indices is not None:
        idx = torch.zeros(n_indices, dtype=torch.long)
    wrapper = Wrapper(idx)
    if n_indices is None:
        ref = reference(y, x, lora_a, lora_b, 1.0, (16,), idx)
    fused()(wrapper, y, x, lora_a, lora_b, 1.0, (16,))
    assert wrapper.original_calls == 1
    if n_indices is None:
        assert torch.allclose(y.double(), ref, atol=1e-5)


@pytest.mark.parametrize("inference", [False, True])
def test_a_slot_written_in_place_is_seen_at_the_next_call_without_vllms_buffer(inference, gemm):
    """vLLM loads an adapter by copying into its stacked tensors: the weights' cache (keyed by version counters;
    inference tensors have none and are re-stacked) must follow, also behind a wrapper that is not vLLM's."""
    ctx = torch.inference_mode() if inference else torch.no_grad()
    with ctx:
        idx, x, lora_a, lora_b, y = make_case(10, 4, 8, 32, (32, 8), torch.float32, seed=4)
        wrapper, op = Wrapper(idx), fused()
        backend, taken = gemm
        for step in range(3):
            y = torch.zeros(10, 40)
            taken.clear()
            op(wrapper, y, x, lora_a, lora_b, 1.0, (32, 8))
            ref = reference(torch.zeros(10, 40), x, lora_a, lora_b, 1.0, (32, 8), idx)
            assert torch.allclose(y.double(), ref, atol=1e-4 * ref.abs().max().item()), f"step {step}"
            # inference tensors are stacked at every call and never packed (packing at every call costs more)
            assert bool(taken) == (backend == "packed" and not inference)
            lora_a[0][1].copy_(torch.randn(1, 8, 32))  # a new adapter in slot 1
            lora_b[1][1].copy_(torch.randn(1, 8, 8))
            idx.copy_(torch.roll(idx, 1))  # the next step's rows
            idx[0] = 1


class VllmWrapper:
    """vLLM's layout: a fixed indices buffer rewritten in place each step, its live length in ``indices_len``."""

    def __init__(self, capacity: int):
        self._token_lora_indices = torch.full((capacity,), -1, dtype=torch.long)
        self.indices_len = [0]
        self.original_calls = 0

    @property
    def token_lora_indices(self):
        return self._token_lora_indices[:self.indices_len[0]]

    def set(self, indices: torch.Tensor) -> None:
        self._token_lora_indices[:len(indices)].copy_(indices)
        self.indices_len[0] = len(indices)


def test_vllms_indices_buffer_rewritten_each_step_gives_each_step_its_own_rows(gemm):
    wrapper, op = VllmWrapper(64), fused()
    gen = torch.Generator().manual_seed(5)
    _, _, lora_a, lora_b, _ = make_case(1, 4, 8, 32, (16, 16, 8), torch.float32, seed=6)
    steps = [torch.tensor([0, 1, 2, 3]), torch.tensor([3, 2, 1, 0]), torch.tensor([3, 2, 1, 0]),
             torch.tensor([-1, 0, -1]), torch.tensor([-1, -1]), torch.tensor([2] * 9)]
    for step, idx in enumerate(steps):
        wrapper.set(idx)
        x = torch.randn(len(idx), 32, generator=gen)
        y0 = torch.randn(len(idx), 40, generator=gen)
        y = y0.clone()
        op(wrapper, y, x, lora_a, lora_b, 1.0, (16, 16, 8))
        ref = reference(y0, x, lora_a, lora_b, 1.0, (16, 16, 8), idx)
        assert torch.allclose(y.double(), ref, rtol=0, atol=1e-4 * ref.abs().max().item()), f"step {step}"
        assert torch.equal(y[idx < 0], y0[idx < 0])
    assert wrapper.original_calls == 0
    backend, taken = gemm
    assert len(taken) == (5 if backend == "packed" else 0)  # every step with an adapter row


def test_logits_lora_is_skipped_only_while_every_slot_of_b_is_zero():
    calls = []

    def original_logits(wrapper, y, x, lora_a, lora_b, scale, *, buffer=None, **kwargs):
        calls.append(1)
        y.add_(x @ lora_a[0, 0].T @ lora_b[0, 0].T)  # slot 0 for every row: enough to see it ran

    op = lora_fused.make_add_lora_logits(original_logits)
    wrapper = Wrapper(torch.zeros(3, dtype=torch.long))
    x, y0 = torch.randn(3, 16), torch.randn(3, 100)
    lora_a, lora_b = torch.randn(4, 1, 8, 16), torch.zeros(4, 1, 100, 8)  # no adapter trains lm_head
    y = y0.clone()
    op(wrapper, y, x, lora_a, lora_b, 1.0)
    assert not calls and torch.equal(y, y0)
    lora_b[2, 0, :5].copy_(torch.randn(5, 8))  # an adapter with an lm_head loaded into slot 2
    op(wrapper, y, x, lora_a, lora_b, 1.0)
    assert len(calls) == 1
    lora_b[2] = 0  # vLLM's reset_lora
    op(wrapper, y, x, lora_a, lora_b, 1.0)
    assert len(calls) == 1


@pytest.mark.parametrize("slots_used", [[5, 6], [9], [14, 2], [3, -1]])
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_only_the_range_of_used_slots_is_read_and_one_slot_needs_no_mask(slots_used, scale, gemm):
    """16 slots loaded, a few used: the fused path reads slots lo..hi only (a NaN in any other slot would show)."""
    idx, x, lora_a, lora_b, y = make_case(12, 16, 8, 32, (32, 16, 16), torch.float32, seed=7)
    idx = torch.tensor((slots_used * 12)[:12])
    lo, hi = min(s for s in slots_used if s >= 0), max(slots_used) + 1
    for w in (*lora_a, *lora_b):
        w[:lo] = float("nan")
        w[hi:] = float("nan")
    y0 = y.clone()
    wrapper = Wrapper(idx)
    fused()(wrapper, y, x, lora_a, lora_b, scale, (32, 16, 16))
    assert wrapper.original_calls == 0 and bool(gemm[1]) == (gemm[0] == "packed")
    ref = reference(y0, x, lora_a, lora_b, scale, (32, 16, 16), idx)
    assert torch.allclose(y.double(), ref, rtol=0, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("rewrite_indices", [True, False])
def test_an_adapter_loaded_between_two_steps_with_the_same_rows_is_used(rewrite_indices, gemm):
    """vLLM skips ``update_metadata`` when the mapping and the slots are unchanged: a slot can be written
    while the indices buffer stays as it was (``rewrite_indices=False``)."""
    wrapper, op = VllmWrapper(16), fused()
    idx, x, lora_a, lora_b, _ = make_case(6, 4, 8, 32, (32, 8), torch.float32, seed=8, none_share=0.0)
    wrapper.set(idx)
    for step in range(3):
        if rewrite_indices:
            wrapper.set(idx)
        y = torch.zeros(6, 40)
        op(wrapper, y, x, lora_a, lora_b, 1.0, (32, 8))
        ref = reference(torch.zeros(6, 40), x, lora_a, lora_b, 1.0, (32, 8), idx)
        assert torch.allclose(y.double(), ref, rtol=0, atol=1e-4 * ref.abs().max().item()), f"step {step}"
        assert len(gemm[1]) == (step + 1 if gemm[0] == "packed" else 0)
        for w in (*lora_a, *lora_b):  # set_lora of every slot
            w.copy_(torch.randn(w.shape))


@pytest.mark.parametrize("slots,rows,busy,path", [
    (10, 32, 0, "grouped"), (16, 32, 0, "grouped"), (16, 32, 4, "grouped"),  # interleaved; one slot somewhat busy
    (16, 200, 150, "masked"),  # one busy slot among idle ones: the padded block would be mostly zeros
    (12, 5, 0, "grouped"),  # most slots of the range without a row; exactly at the padding bound (12 = 3 · 4)
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_wide_slot_range_groups_the_rows_and_equals_the_reference(monkeypatch, slots, rows, busy, path, dtype):
    """From GROUPED_MIN_SLOTS slots on, rows are grouped by slot (not masked) unless the padded block would hold
    more than GROUPED_MAX_PADDING times the rows; either way: the reference, and -1 rows bit for bit."""
    assert slots >= lora_fused.GROUPED_MIN_SLOTS
    taken = []
    real = lora_fused.grouped_lora_linear
    monkeypatch.setattr(lora_fused, "grouped_lora_linear", lambda *a, **k: taken.append(1) or real(*a, **k))
    _, x, lora_a, lora_b, y = make_case(rows, slots, 8, 40, (40, 8, 8), dtype, seed=slots + rows)
    idx = torch.arange(rows) % slots  # decode rows of many tenants, interleaved
    idx[:busy] = 3
    idx[1::5] = -1  # rows without an adapter
    idx[-1] = slots - 1  # the whole range is used (row 0 has slot 0 unless a busy slot took it)
    if busy:
        idx[-2] = 0
    y0 = y.clone()
    wrapper = Wrapper(idx)
    fused()(wrapper, y, x, lora_a, lora_b, 0.5, (40, 8, 8))
    assert taken == ([1] if path == "grouped" else []) and wrapper.original_calls == 0
    ref = reference(y0, x, lora_a, lora_b, 0.5, (40, 8, 8), idx)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    err = (y.double() - ref).abs().max().item() / ref.abs().max().item()
    assert err < tol, f"relative error {err:.2e} > {tol}"
    none = idx < 0
    assert none.any() and torch.equal(y[none], y0[none])


def test_row_groups_places_each_row_once_in_its_slots_block():
    idx = torch.tensor([5, -1, 3, 5, 5, 12, -1, 3])
    rows, positions, t_max = lora_fused.row_groups(idx, 3, 13)
    assert t_max == 3  # slot 5 has three rows
    assert sorted(rows.tolist()) == [0, 2, 3, 4, 5, 7]  # every row with a slot, once
    assert len(set(positions.tolist())) == rows.numel()
    for row, pos in zip(rows.tolist(), positions.tolist()):
        assert pos // t_max == idx[row] - 3  # in its slot's block
    assert lora_fused.GROUPED_MIN_SLOTS == 10 and lora_fused.GROUPED_MAX_PADDING == 3  # the cases below assume these
    assert lora_fused.StepSlots(idx).groups() is None  # a block of 10·3 = 30 rows for 6 rows: more than 3×: masked
    assert lora_fused.StepSlots(torch.tensor([-1, *range(10)])).groups() is not None  # 10 rows for 10: grouped
    assert lora_fused.StepSlots(torch.tensor([0, 1, 2])).groups() is None  # a range of 3: masked
    even = lora_fused.StepSlots(torch.arange(10))
    assert even.groups_for((8, 8)) is not None  # a joined output of 10 × 16 elements
    assert even.groups_for((lora_fused.GROUPED_MAX_ELEMENTS // 10 + 1,)) is None  # too large a temporary: masked


def test_a_layer_whose_joined_output_is_too_large_is_masked(monkeypatch):
    """The same step groups a small layer and masks one whose joined output exceeds GROUPED_MAX_ELEMENTS (the call
    site asks per layer); both equal the reference."""
    monkeypatch.setattr(lora_fused, "GROUPED_MAX_ELEMENTS", 16 * 2 * 40)  # a block of 16·2 rows × Σ out 40 fits
    taken = []
    real = lora_fused.grouped_lora_linear
    monkeypatch.setattr(lora_fused, "grouped_lora_linear", lambda *a, **k: taken.append(1) or real(*a, **k))
    idx = torch.arange(32) % 16  # t_max 2
    wrapper, op = Wrapper(idx), fused()
    for slices, want in (((24, 8, 8), [1]), ((24, 16, 8), [])):
        taken.clear()
        _, x, lora_a, lora_b, y = make_case(32, 16, 8, 40, slices, torch.float32, seed=sum(slices))
        y0 = y.clone()
        op(wrapper, y, x, lora_a, lora_b, 1.0, slices)
        assert taken == want
        ref = reference(y0, x, lora_a, lora_b, 1.0, slices, idx)
        assert (y.double() - ref).abs().max().item() / ref.abs().max().item() < 1e-4


def test_expand_weight_is_every_slices_b_block_diagonal_in_the_shrinks_column_order():
    """H @ expand_weightᵀ, with H's columns slot-major as the shrink writes them, equals each slice's own product."""
    gen = torch.Generator().manual_seed(11)
    slots, r, slices, lo, hi = 5, 4, (6, 3, 2), 1, 4
    bs = [torch.randn(slots * r, size, generator=gen) for size in slices]  # stack_weights' [S·r, out_k]
    w = lora_fused.expand_weight(bs, lo, hi, r, slices)
    width, n = hi - lo, len(slices)
    assert w.shape == (sum(slices), width * n * r)
    h = torch.randn(7, width * n * r, generator=gen)
    hv = h.view(7, width, n, r)
    want = torch.cat([hv[:, :, k].reshape(7, width * r) @ bs[k][lo * r:hi * r] for k in range(n)], dim=1)
    assert torch.allclose(h @ w.T, want, atol=1e-5)
    assert int((w != 0).sum()) == sum(width * r * size for size in slices)  # zeros outside the blocks


def test_packed_matrices_follow_the_slot_range_and_a_layer_keeps_a_few_ranges(monkeypatch):
    """Each step's slot range gets its own packed matrices (built once, then reused); a layer keeps its
    PACKED_RANGES most recently used ranges; every step equals the reference."""
    if not packed_gemm_available():
        pytest.skip("vLLM (its oneDNN GEMM) is not installed")
    built = []
    real = lora_fused.PackedMatmul
    monkeypatch.setattr(lora_fused, "PackedMatmul", lambda w: built.append(w.shape) or real(w))
    wrapper, op = VllmWrapper(32), fused()
    _, _, lora_a, lora_b, _ = make_case(1, 8, 8, 32, (16, 8), torch.float32, seed=12)
    gen = torch.Generator().manual_seed(13)
    ranges = [(0, 4), (0, 4), (2, 3), (1, 8), (0, 2), (0, 4), (5, 7), (2, 3)]
    for step, (lo, hi) in enumerate(ranges):
        idx = torch.arange(12) % (hi - lo) + lo
        idx[3] = -1
        wrapper.set(idx)
        x, y0 = torch.randn(12, 32, generator=gen), torch.randn(12, 24, generator=gen)
        y = y0.clone()
        op(wrapper, y, x, lora_a, lora_b, 1.0, (16, 8))
        ref = reference(y0, x, lora_a, lora_b, 1.0, (16, 8), idx)
        assert torch.allclose(y.double(), ref, rtol=0, atol=1e-4 * ref.abs().max().item()), f"step {step}"
        assert torch.equal(y[3], y0[3])
    # (0, 4) reused; (0, 4) used again before (5, 7) arrives, so (2, 3), the least recently used, makes room and
    # is packed again at the end: 6 packings of 2 matrices
    assert len(built) == 2 * 6 and lora_fused.PACKED_RANGES == 4
    assert built[0] == (4 * 2 * 8, 32) and built[1] == (24, 4 * 2 * 8)  # shrink [S'·n·r, in]; expand [Σ out, S'·n·r]


def test_a_matrix_onednn_refuses_takes_torchs_fused_call_and_is_not_packed_again(monkeypatch):
    if not packed_gemm_available():
        pytest.skip("vLLM (its oneDNN GEMM) is not installed")
    tries = []

    def refuse(*args, **kwargs):
        tries.append(1)
        raise RuntimeError("unsupported")

    monkeypatch.setattr(lora_fused.onednn_ops(), "create_onednn_mm", refuse)
    w = torch.randn(6, 5)
    mm = lora_fused.PackedMatmul(w)
    assert not mm.ok
    x = torch.randn(3, 5)
    assert torch.allclose(mm(x), x @ w.T)
    tries.clear()
    idx, x, lora_a, lora_b, y = make_case(8, 4, 8, 32, (32, 8), torch.float32, seed=14)
    wrapper, op = Wrapper(idx), fused()
    for _ in range(3):
        y0 = y.clone()
        op(wrapper, y, x, lora_a, lora_b, 1.0, (32, 8))
        ref = reference(y0, x, lora_a, lora_b, 1.0, (32, 8), idx)
        assert torch.allclose(y.double(), ref, rtol=0, atol=1e-4 * ref.abs().max().item())
    assert len(tries) == 2  # the shrink and the expand, tried once: the refusal is remembered
