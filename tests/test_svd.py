"""Unit tests of the SVD and PiSSA-split maths (converter/svd.py, converter/factorize.py).

Matrices are built with a known spectrum: ``W = U diag(σ) Vᵀ`` with ``U``, ``V`` Haar-random
orthonormal (QR of a Gaussian) and ``σ`` chosen, so the exact top-r triple is known in advance.

Tolerances:
- float64 maths: singular values to rtol 1e-10, singular subspaces to 1e-8 (the Gram-eigh path of
  ``exact_top_r`` squares the condition number, so its vector error is about ``1e-16·σ₁²/(σ_r²−σ_{r+1}²)``;
  the spectra below keep that under 1e-12).
- float32 maths: 1e-4 relative on values of order 1.
Singular vectors are defined up to sign, so vectors are compared after aligning signs.
"""

from __future__ import annotations

import math

import pytest
import torch

from converter.factorize import lora_scaling, pissa_split
from converter.svd import SvdOptions, exact_top_r, gaussian_sketch, randomized_top_r, top_r_svd


def _orthonormal(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # Haar-distributed


def known_spectrum(m: int, n: int, sigma: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``(W, U, σ, Vh)`` with ``W = U diag(σ) Vh`` in float64; ``len(σ) <= min(m, n)``."""
    gen = torch.Generator().manual_seed(seed)
    k = sigma.numel()
    u = _orthonormal(m, k, gen)
    v = _orthonormal(n, k, gen)
    return (u * sigma) @ v.T, u, sigma, v.T


def power_law(k: int, exponent: float = 0.6) -> torch.Tensor:
    return torch.arange(1, k + 1, dtype=torch.float64) ** -exponent


def align(u: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Flip the sign of each column of ``u`` to agree with ``ref``."""
    return u * torch.sign((u * ref).sum(dim=0))


def captured(s: torch.Tensor, sigma: torch.Tensor, rank: int) -> float:
    """Share of the exact top-r energy captured: Σ s_i² / Σ_{i≤r} σ_i²."""
    return float(s.double().square().sum() / sigma[:rank].square().sum())


def assert_rank3_factors(u, s, vh, w, sigma, *, values: float, vectors: float) -> None:
    """Six float64 triples of a rank-3 ``w``: its three singular values, zeros, orthonormal vectors, exact product."""
    torch.testing.assert_close(s[:3], sigma, rtol=values, atol=0)
    assert float(s[3:].abs().max()) < values
    eye = torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(u.T @ u, eye, atol=vectors, rtol=0)
    torch.testing.assert_close(vh @ vh.T, eye, atol=vectors, rtol=0)
    torch.testing.assert_close((u * s) @ vh, w, atol=values, rtol=0)


# --- exact_top_r ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(96, 160), (160, 96), (128, 128)], ids=["wide", "tall", "square"])
@pytest.mark.parametrize("rank", [1, 8, 40, 70], ids=lambda r: f"r{r}")
def test_exact_matches_full_svd(shape, rank):
    """Gram-eigh path (rank <= min/2) and full-SVD path (rank > min/2) both equal torch.linalg.svd."""
    m, n = shape
    k = min(m, n)
    w, u_true, sigma, vh_true = known_spectrum(m, n, power_law(k), seed=rank)
    u, s, vh = exact_top_r(w, rank)
    assert u.shape == (m, rank) and s.shape == (rank,) and vh.shape == (rank, n)
    assert u.dtype == s.dtype == vh.dtype == torch.float64
    torch.testing.assert_close(s, sigma[:rank], rtol=1e-10, atol=0)

    u_ref, s_ref, vh_ref = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(s, s_ref[:rank], rtol=1e-10, atol=0)
    torch.testing.assert_close(align(u, u_ref[:, :rank]), u_ref[:, :rank], atol=1e-8, rtol=0)
    torch.testing.assert_close(align(vh.T, vh_ref[:rank].T), vh_ref[:rank].T, atol=1e-8, rtol=0)
    # U and V are orthonormal and U diag(s) Vh is the best rank-r approximation.
    eye = torch.eye(rank, dtype=torch.float64)
    torch.testing.assert_close(u.T @ u, eye, atol=1e-10, rtol=0)
    torch.testing.assert_close(vh @ vh.T, eye, atol=1e-10, rtol=0)
    best = (u_ref[:, :rank] * s_ref[:rank]) @ vh_ref[:rank]
    torch.testing.assert_close((u * s) @ vh, best, atol=1e-10, rtol=0)


def test_exact_float32_input_returns_float32_close_to_float64():
    w64, _, sigma, _ = known_spectrum(64, 200, power_law(64), seed=3)
    u, s, vh = exact_top_r(w64.float(), 8)
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    torch.testing.assert_close(s.double(), sigma[:8], rtol=1e-5, atol=0)


def test_exact_batched_equals_unbatched():
    ws = torch.stack([known_spectrum(48, 80, power_law(48), seed=i)[0] for i in range(3)])
    u, s, vh = exact_top_r(ws, 6)
    assert u.shape == (3, 48, 6) and s.shape == (3, 6) and vh.shape == (3, 6, 80)
    for i in range(3):
        ui, si, vhi = exact_top_r(ws[i], 6)
        assert torch.equal(u[i], ui) and torch.equal(s[i], si) and torch.equal(vh[i], vhi)


def test_exact_rank_deficient_falls_back_to_full_svd(monkeypatch):
    """W of rank 3, asked for r = 6: σ_4..σ_6 are 0, so Vh = Uᵀ W / S would divide by ~0.

    The Gram-eigh path must detect it (σ_r <= 1e-6·σ₁) and use a full SVD, which still returns
    orthonormal vectors and reproduces W exactly.
    """
    w, _, sigma, _ = known_spectrum(64, 128, torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), seed=7)
    calls = []
    real_svd = torch.linalg.svd

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real_svd(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", spy)
    u, s, vh = exact_top_r(w, 6)
    assert calls == [(64, 128)], "the rank-deficient matrix did not take the full-SVD fallback"
    assert torch.isfinite(u).all() and torch.isfinite(vh).all()
    assert_rank3_factors(u, s, vh, w, sigma, values=1e-12, vectors=1e-10)

    # A well-conditioned matrix of the same shape stays on the Gram-eigh path (no full SVD).
    calls.clear()
    exact_top_r(known_spectrum(64, 128, power_law(64), seed=8)[0], 6)
    assert calls == []


# --- randomized_top_r -------------------------------------------------------------------------


def _flat_matrix() -> tuple[torch.Tensor, torch.Tensor]:
    """A slowly decaying spectrum (σ_i = i^-0.3), where the randomized method needs work to converge."""
    w, _, sigma, _ = known_spectrum(256, 384, power_law(256, 0.3), seed=11)
    return w, sigma


def _randomized_capture(w, sigma, rank, niter, oversample, seed=0, tol=0.0):
    opts = SvdOptions(method="randomized", niter=niter, oversample=oversample, precision="float64", tol=tol)
    _, s, _ = top_r_svd(w, rank, opts, seeds=[seed])
    return captured(s, sigma, rank)


def test_randomized_converges_with_power_iterations():
    """Captured top-r energy grows towards 1 as niter grows (fixed seed and oversampling)."""
    w, sigma = _flat_matrix()
    rank = 16
    gaps = [1 - _randomized_capture(w, sigma, rank, niter, 8) for niter in (0, 1, 2, 4, 8, 16, 32)]
    assert all(g >= -1e-12 for g in gaps), "cannot capture more than the exact top-r energy"
    for a, b in zip(gaps, gaps[1:]):
        assert b <= a + 1e-12, f"more power iterations lost energy: {gaps}"
    assert gaps[0] > 0.05  # a flat spectrum: one pass is far from converged ...
    assert gaps[-1] < 1e-3  # ... many passes converge
    assert gaps[-1] < gaps[0] / 50


def test_randomized_converges_with_oversampling():
    """At a fixed small niter, more oversampling (a wider Krylov block) captures more (averaged over
    4 seeds); the widths keep all niter + 1 = 3 blocks inside min(m, n) = 256."""
    w, sigma = _flat_matrix()
    rank = 16

    def gap(p):
        return sum(1 - _randomized_capture(w, sigma, rank, 2, p, seed) for seed in range(4)) / 4

    gaps = [gap(p) for p in (0, 8, 32, 64)]
    for a, b in zip(gaps, gaps[1:]):
        assert b < a, f"more oversampling lost energy: {gaps}"
    assert gaps[-1] < gaps[0] / 3


def _count_qr(monkeypatch) -> list[int]:
    calls: list[int] = []
    real_qr = torch.linalg.qr

    def spy(*args, **kwargs):
        calls.append(1)
        return real_qr(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "qr", spy)
    return calls


def test_randomized_stops_early_on_a_fast_decaying_spectrum(monkeypatch):
    """tol > 0: a steep spectrum (σ_i = i^-2) converges in a few Krylov blocks, and stopping there
    loses nothing measurable; tol = 0 runs all ``niter`` (one QR per block: niter + 1 blocks, as
    long as they fit in min(m, n) = 300)."""
    w, _, sigma, _ = known_spectrum(300, 400, power_law(300, 2.0), seed=13)
    calls = _count_qr(monkeypatch)
    full = _randomized_capture(w, sigma, 8, 10, 8, tol=0.0)
    assert len(calls) == 10 + 1
    calls.clear()
    early = _randomized_capture(w, sigma, 8, 10, 8, tol=1e-4)
    assert 2 <= len(calls) <= 5, len(calls)
    assert early == pytest.approx(full, abs=1e-8)


def test_randomized_block_count_is_capped_by_the_short_side(monkeypatch):
    """niter = 20 blocks of 16 would exceed min(m, n) = 300: the space stops at 300 // 16 = 18 blocks."""
    w, _, sigma, _ = known_spectrum(300, 400, power_law(300, 2.0), seed=13)
    calls = _count_qr(monkeypatch)
    assert _randomized_capture(w, sigma, 8, 20, 8, tol=0.0) == pytest.approx(1.0, abs=1e-12)
    assert len(calls) == 18


def test_randomized_early_stop_keeps_accuracy_on_a_flat_spectrum():
    """On a flat spectrum the gain per iteration stays above tol for longer: the early-stopped
    result is within a few tol of the full run (the remaining gain decays geometrically)."""
    w, sigma = _flat_matrix()
    full = 1 - _randomized_capture(w, sigma, 16, 12, 8, tol=0.0)
    early = 1 - _randomized_capture(w, sigma, 16, 12, 8, tol=1e-4)
    assert full <= early <= full + 1e-3


def test_randomized_exact_when_spectrum_has_a_gap():
    """A rank-r matrix plus tiny noise: one power iteration recovers the top-r triple to noise level."""
    w, u_true, sigma, vh_true = known_spectrum(200, 300, power_law(200, 2.0), seed=5)
    u, s, vh = top_r_svd(w, 4, SvdOptions(niter=4, oversample=8, precision="float64", tol=1e-4), seeds=[1])
    u_ref, s_ref, vh_ref = exact_top_r(w, 4)
    torch.testing.assert_close(s, s_ref, rtol=1e-8, atol=0)
    torch.testing.assert_close(align(u, u_ref), u_ref, atol=1e-6, rtol=0)


def test_warm_start_converges_in_two_blocks(monkeypatch):
    """``start`` = the top-r right singular vectors of a nearby matrix, scaled like a ``lora_Aᵀ`` (what
    QPiSSA's refits pass). On a flat spectrum, where a Gaussian start needs six Krylov blocks (one QR
    each), a start from W itself (noise 1e-4 of the entries) stops after two with the cold start's
    accuracy; one from W plus noise of 10% of its entries' size (more than NF4's error on real weights)
    after at most three, within the early stop's tolerance (1e-3) of the exact top-r energy. Both
    orientations."""
    w0, sigma = _flat_matrix()
    gen = torch.Generator().manual_seed(2)
    noise = torch.randn(w0.shape, generator=gen, dtype=w0.dtype) * float(w0.pow(2).mean().sqrt())
    opts = SvdOptions(precision="float64", tol=1e-3)
    for transpose in (False, True):
        w = w0.T if transpose else w0
        calls = _count_qr(monkeypatch)
        _, s_cold, _ = top_r_svd(w, 16, opts, seeds=[0])
        cold = len(calls)
        assert cold >= 5
        for level, blocks, within in ((1e-4, 2, 1e-5), (0.1, 3, 1e-3)):
            near = w + level * (noise.T if transpose else noise)
            _, s_near, vh_near = exact_top_r(near, 16)
            calls.clear()
            _, s_warm, _ = top_r_svd(w, 16, opts, start=(s_near.sqrt().unsqueeze(-1) * vh_near).T)
            assert len(calls) <= blocks, (transpose, level, len(calls))
            assert captured(s_warm, sigma, 16) >= captured(s_cold, sigma, 16) - within
            assert captured(s_warm, sigma, 16) > 1 - 1e-3
        monkeypatch.undo()


def test_warm_start_shape_is_checked_and_exact_ignores_it():
    w, _ = _flat_matrix()
    with pytest.raises(ValueError, match="does not fit"):
        top_r_svd(w, 16, SvdOptions(), start=torch.zeros(w.shape[0], 16, dtype=w.dtype))  # rows', not columns' side
    with pytest.raises(ValueError, match="does not fit"):
        top_r_svd(w, 16, SvdOptions(), start=torch.zeros(w.shape[1], 8, dtype=w.dtype))  # fewer columns than r
    exact = top_r_svd(w, 4, SvdOptions(method="exact"))
    ignored = top_r_svd(w, 4, SvdOptions(method="exact"), start=torch.zeros(w.shape[1], 4, dtype=w.dtype))
    assert all(torch.equal(a, b) for a, b in zip(exact, ignored))


def test_randomized_is_seeded_and_deterministic():
    w, _ = _flat_matrix()
    w = w.float()
    opts = SvdOptions(niter=2, oversample=4)
    a = top_r_svd(w, 8, opts, seeds=[123])
    b = top_r_svd(w, 8, opts, seeds=[123])
    c = top_r_svd(w, 8, opts, seeds=[124])
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[1], c[1])  # another seed, another sketch
    assert torch.equal(gaussian_sketch(50, 7, 9, torch.float32), gaussian_sketch(50, 7, 9, torch.float32))
    # The sketch depends on the seed only, not on global RNG state.
    torch.manual_seed(999)
    d = top_r_svd(w, 8, opts, seeds=[123])
    assert torch.equal(a[1], d[1])


def test_randomized_batched_equals_per_matrix():
    """A batch with per-matrix seeds gives each matrix its own result (to float64 rounding)."""
    ws = torch.stack([known_spectrum(64, 96, power_law(64), seed=i)[0] for i in range(3)])
    opts = SvdOptions(niter=3, oversample=8, precision="float64", tol=0.0)
    u, s, vh = top_r_svd(ws, 5, opts, seeds=[10, 11, 12])
    for i in range(3):
        ui, si, vhi = top_r_svd(ws[i], 5, opts, seeds=[10 + i])
        torch.testing.assert_close(s[i], si, rtol=1e-12, atol=0)
        torch.testing.assert_close(align(u[i], ui), ui, atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="need 3 seeds"):
        top_r_svd(ws, 5, opts, seeds=[1])


@pytest.mark.parametrize("exponent", [1.0, 0.3, 0.1], ids=["decaying", "slow", "flat"])
@pytest.mark.parametrize("shape", [(256, 640), (640, 256)], ids=["wide", "tall"])
def test_krylov_defaults_accuracy_vs_full_svd(shape, exponent):
    """Default options (float32, l = r, tol 1e-3): the top-16 energy is within 5e-4 of the full SVD's
    on decaying and flat spectra, at least PEFT's ``svd_lowrank(q=r, niter=16)``'s, the factors are
    orthonormal and U S Vh is as good a rank-16 approximation as the exact one (to the same 5e-4)."""
    m, n = shape
    w64, _, sigma, _ = known_spectrum(m, n, power_law(min(m, n), exponent), seed=21)
    w = w64.float()
    best_err = float(sigma[16:].square().sum())
    for seed in range(3):
        u, s, vh = top_r_svd(w, 16, SvdOptions(), seeds=[seed])
        assert u.shape == (m, 16) and s.shape == (16,) and vh.shape == (16, n)
        assert u.dtype == s.dtype == vh.dtype == torch.float32
        got = captured(s, sigma, 16)
        assert 1 - 5e-4 <= got <= 1 + 1e-6, got
        torch.manual_seed(seed)
        _, s_peft, _ = torch.svd_lowrank(w, q=16, niter=16)
        assert got >= captured(s_peft, sigma, 16) - 1e-5
        assert bool((s[:-1] >= s[1:]).all()), "singular values must be descending"
        eye = torch.eye(16)
        torch.testing.assert_close(u.T @ u, eye, atol=2e-6, rtol=0)
        torch.testing.assert_close(vh @ vh.T, eye, atol=2e-6, rtol=0)
        err = float((w64 - (u.double() * s.double()) @ vh.double()).square().sum())
        assert err <= best_err + 5e-4 * float(sigma[:16].square().sum()), (err, best_err)


def test_krylov_beats_subspace_iteration_at_equal_passes():
    """The point of keeping the Krylov space: on a flat spectrum, 6 blocks of r (12 passes over W)
    capture more than PEFT's subspace iteration with 16 power iterations (34 passes)."""
    w, sigma = _flat_matrix()
    ours = sum(_randomized_capture(w, sigma, 16, 5, 0, seed) for seed in range(4)) / 4
    peft = 0.0
    for seed in range(4):
        torch.manual_seed(seed)
        peft += captured(torch.svd_lowrank(w, q=16, niter=16)[1], sigma, 16) / 4
    assert ours > peft, (ours, peft)


@pytest.mark.parametrize("shape", [(64, 128), (128, 64)], ids=["wide", "tall"])
def test_krylov_rank_deficient_matrix(shape):
    """W of rank 3, r = 6: the Krylov space becomes invariant (breakdown: for a tall W the second
    block has rank 3 after projection); the result is still finite, orthonormal, exact on the 3
    non-zero values, and reproduces W."""
    w, _, sigma, _ = known_spectrum(*shape, torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), seed=7)
    u, s, vh = top_r_svd(w, 6, SvdOptions(niter=6, oversample=2, precision="float64", tol=0.0), seeds=[0])
    assert torch.isfinite(u).all() and torch.isfinite(s).all() and torch.isfinite(vh).all()
    assert_rank3_factors(u, s, vh, w, sigma, values=1e-10, vectors=1e-8)
    zero = top_r_svd(torch.zeros(*shape), 4, SvdOptions(), seeds=[0])
    assert all(torch.isfinite(x).all() for x in zero) and float(zero[1].abs().max()) == 0.0


def test_krylov_default_is_bit_deterministic_on_both_orientations():
    """Same matrix and seed: bit-identical U, S, Vh, for the wide and the tall (transposed) path."""
    w, _ = _flat_matrix()
    for mat in (w.float(), w.float().T.contiguous()):
        a = top_r_svd(mat, 16, SvdOptions(), seeds=[5])
        b = top_r_svd(mat.clone(), 16, SvdOptions(), seeds=[5])
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_randomized_falls_back_to_exact_when_sketch_spans_everything():
    """rank + oversample >= min(m, n): the sketch would be the whole space, so the exact path runs."""
    w, _, sigma, _ = known_spectrum(24, 40, power_law(24), seed=2)
    omega = gaussian_sketch(40, 24, 0, torch.float64)
    u, s, vh = randomized_top_r(w, 10, niter=0, oversample=16, omega=omega)
    assert all(torch.equal(x, y) for x, y in zip((u, s, vh), exact_top_r(w, 10)))


# --- pissa_split --------------------------------------------------------------------------------


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_pissa_split_maths(rslora):
    """B = U_r √(S_r/s), A = √(S_r/s) V_rᵀ, W_res = W − s·BA, with s = α/r (or α/√r with rsLoRA)."""
    rank, alpha = 8, 32.0
    scaling = lora_scaling(alpha, rank, rslora)
    assert scaling == pytest.approx(alpha / math.sqrt(rank) if rslora else alpha / rank)
    w, u_true, sigma, vh_true = known_spectrum(96, 160, power_law(96), seed=4)
    split = pissa_split(
        w.float(), rank=rank, scaling=scaling, svd=SvdOptions(method="exact"), adapter_dtype=torch.float32
    )
    a, b = split.lora_A.double(), split.lora_B.double()
    assert a.shape == (rank, 160) and b.shape == (96, rank)
    # s·BA is the best rank-r approximation U_r S_r V_rᵀ.
    best = (u_true[:, :rank] * sigma[:rank]) @ vh_true[:rank]
    torch.testing.assert_close(scaling * (b @ a), best, atol=1e-5, rtol=0)
    # Column norms of B and row norms of A are both √(σ_i / s) (PEFT's symmetric split).
    root = (sigma[:rank] / scaling).sqrt()
    torch.testing.assert_close(b.norm(dim=0), root, rtol=1e-5, atol=0)
    torch.testing.assert_close(a.norm(dim=1), root, rtol=1e-5, atol=0)
    torch.testing.assert_close(split.residual.double() + scaling * (b @ a), w, atol=1e-5, rtol=0)
    expected_energy = float(sigma[:rank].square().sum() / sigma.square().sum())
    assert float(split.energy) == pytest.approx(expected_energy, rel=1e-5)
    assert float(split.rel_error) < 1e-6


def test_rslora_changes_only_the_scale_of_the_adapter():
    """With rsLoRA the product s·BA is the same; A and B are rescaled by √(s_lora / s_rslora)."""
    w, *_ = known_spectrum(64, 96, power_law(64), seed=6)
    rank, alpha = 16, 16.0
    opts = SvdOptions(method="exact")
    plain = pissa_split(w.float(), rank=rank, scaling=lora_scaling(alpha, rank, False), svd=opts)
    rs = pissa_split(w.float(), rank=rank, scaling=lora_scaling(alpha, rank, True), svd=opts)
    factor = math.sqrt(lora_scaling(alpha, rank, False) / lora_scaling(alpha, rank, True))  # r^-1/4
    torch.testing.assert_close(rs.lora_A, plain.lora_A * factor, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(rs.lora_B, plain.lora_B * factor, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(rs.residual, plain.residual, atol=1e-6, rtol=0)


def test_pissa_split_fan_in_fan_out():
    """A Conv1D weight stored as Wᵀ gives the same adapter as W, and its residual comes back as W_resᵀ."""
    w, *_ = known_spectrum(80, 48, power_law(48), seed=9)
    w = w.float()
    kwargs = dict(rank=6, scaling=0.5, svd=SvdOptions(niter=4, oversample=8), seeds=[3])
    linear = pissa_split(w, **kwargs)
    conv = pissa_split(w.T.contiguous(), fan_in_fan_out=True, **kwargs)
    assert conv.lora_A.shape == (6, 48) and conv.lora_B.shape == (80, 6)
    assert conv.residual.shape == (48, 80)
    assert torch.equal(conv.lora_A, linear.lora_A) and torch.equal(conv.lora_B, linear.lora_B)
    assert torch.equal(conv.residual, linear.residual.T)
    # nn.Linear orientation: W ≈ W_resᵀ + s·BA.
    torch.testing.assert_close(conv.residual.T + 0.5 * conv.lora_B @ conv.lora_A, w, atol=1e-6, rtol=0)


def test_pissa_split_residual_dtype_rounding():
    """A bf16 residual reproduces W to bf16 rounding of W_res: rel_error about 2^-9 of ‖W_res‖/‖W‖."""
    w, *_ = known_spectrum(128, 256, power_law(128), seed=12)
    split = pissa_split(
        w.float(), rank=16, scaling=1.0, svd=SvdOptions(method="exact"), residual_dtype=torch.bfloat16
    )
    assert split.residual.dtype == torch.bfloat16 and split.lora_A.dtype == torch.float32
    res_share = math.sqrt(1 - float(split.energy))  # ‖W_res‖ / ‖W‖
    assert 0 < float(split.rel_error) <= res_share * 2**-8
    recon = split.residual.double() + split.lora_B.double() @ split.lora_A.double()
    rel = float((recon - w).norm() / w.norm())
    assert rel == pytest.approx(float(split.rel_error), rel=1e-3)


def test_pissa_split_overwrite_forms_the_residual_in_the_input():
    """``overwrite=True`` (a caller's temporary in the SVD dtype): same split bit for bit, the residual
    in the input's own storage; an input of another dtype is still copied, never written."""
    w, _ = _flat_matrix()
    w = w.float()
    kwargs = {"rank": 8, "scaling": 0.5, "svd": SvdOptions(), "seeds": [3]}
    ref = pissa_split(w.clone(), **kwargs)
    tmp = w.clone()
    split = pissa_split(tmp, overwrite=True, **kwargs)
    assert split.residual.data_ptr() == tmp.data_ptr()
    for name in ("lora_A", "lora_B", "residual"):
        assert torch.equal(getattr(split, name), getattr(ref, name)), name
    half = w.bfloat16()
    kept = half.clone()
    pissa_split(half, overwrite=True, **kwargs)
    assert torch.equal(half, kept)


def test_pissa_split_rejects_bad_input():
    w = torch.randn(8, 12)
    with pytest.raises(ValueError, match="out of range"):
        pissa_split(w, rank=9, scaling=1.0, svd=SvdOptions())
    with pytest.raises(ValueError, match="out of range"):
        pissa_split(w, rank=0, scaling=1.0, svd=SvdOptions())
    bad = w.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        pissa_split(bad, rank=2, scaling=1.0, svd=SvdOptions())
