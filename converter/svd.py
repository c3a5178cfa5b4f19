"""Truncated SVD, exact or randomized: tensors in, tensors out, nothing about files.

All functions accept a single matrix ``[m, n]`` or a batch of same-shaped matrices ``[b, m, n]``
and return the top-``rank`` triple ``U [.., m, r]``, ``S [.., r]`` (descending), ``Vh [.., r, n]``
with ``W ≈ U diag(S) Vh``.

Randomized method (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1)::

    Ω ~ N(0, 1)^{n × l},  l = r + p               (p = oversampling)
    Q = orth(W Ω)
    repeat q times:  Q = orth(W orth(Wᵀ Q))       (power iterations, re-orthonormalised each half step)
    B = Qᵀ W  [l × n];  Ũ S Vh = svd(B);  U = Q Ũ;  keep the first r

The error of the rank-r approximation decays like (σ_{l+1}/σ_r)^{2q+1}: oversampling and power
iterations both help, and a flat spectrum (quantised weights) needs more of either. PEFT's
``pissa_niter_N`` calls ``torch.svd_lowrank(q=r)``, i.e. p = 0, which is why it captures less of the
principal energy at equal cost. Ω is drawn from a generator seeded per matrix, so results do not
depend on which process or batch handled a matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

SvdMethod = Literal["exact", "randomized"]


@dataclass(frozen=True)
class SvdOptions:
    """How the top-r singular triples are computed.

    Attributes:
        method: ``exact`` (full thin SVD, then truncate) or ``randomized`` (range finder).
        niter: power iterations of the randomized method.
        oversample: extra columns ``p`` of the randomized sketch (``l = r + p``).
        precision: dtype the factorisation runs in (``float32`` or ``float64``).
        tol: stop the power iterations early once an iteration raises the top-r energy of the
            sketch by less than ``tol`` of it (0: always run ``niter``); see :func:`randomized_top_r`.
    """

    method: SvdMethod = "randomized"
    niter: int = 10
    oversample: int = 16
    precision: Literal["float32", "float64"] = "float32"
    tol: float = 1e-4

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float64 if self.precision == "float64" else torch.float32


def _orth(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the column space (reduced QR), batched."""
    q, _ = torch.linalg.qr(x, mode="reduced")
    return q


def exact_top_r(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact top-``rank`` triple, batched: the eigenpairs of the small Gram matrix in float64.

    For ``W [m, n]`` with ``m <= n``: ``G = W Wᵀ = U S² Uᵀ``; the top-``rank`` eigenpairs of G (LAPACK
    ``syevr`` computes only those) give ``U_r`` and ``S_r``, and ``Vh_r = S_r⁻¹ U_rᵀ W``. For ``m > n``
    the same on ``WᵀW``. In float64 the eigenvector error is about ``1e-16 · σ₁² / gap``, far below
    float32 rounding, while the cost is one Gram product plus a partial eigensolve instead of a full
    SVD (about 2–3× less on CPU). When ``σ_r`` is tiny relative to ``σ₁`` (rank-deficient W), the
    division is ill-conditioned and we fall back to a full ``torch.linalg.svd`` in float64.
    Results are returned in ``w``'s dtype.
    """
    if w.dim() > 2:
        parts = [exact_top_r(x, rank) for x in w.reshape(-1, *w.shape[-2:])]
        batch = w.shape[:-2]
        return tuple(  # type: ignore[return-value]
            torch.stack([p[i] for p in parts]).reshape(*batch, *parts[0][i].shape) for i in range(3)
        )
    m, n = w.shape
    wd = w.to(torch.float64)
    if w.device.type != "cpu" or rank > min(m, n) // 2:
        u, s, vh = torch.linalg.svd(wd, full_matrices=False)
        return u[:, :rank].to(w.dtype), s[:rank].to(w.dtype), vh[:rank].to(w.dtype)
    from scipy.linalg import eigh

    tall = m > n
    gram = (wd.T @ wd) if tall else (wd @ wd.T)
    k = gram.shape[0]
    evals, evecs = eigh(
        gram.numpy(), subset_by_index=[k - rank, k - 1], driver="evr", overwrite_a=True, check_finite=False
    )
    evals = torch.from_numpy(evals[::-1].copy()).clamp_min(0)
    vecs = torch.from_numpy(evecs[:, ::-1].copy())
    s = evals.sqrt()
    if s[-1] <= 1e-6 * s[0] or not torch.isfinite(s).all():
        u, s, vh = torch.linalg.svd(wd, full_matrices=False)
        return u[:, :rank].to(w.dtype), s[:rank].to(w.dtype), vh[:rank].to(w.dtype)
    if tall:  # vecs are V_r [n, r]; U_r = W V_r / S_r
        u = (wd @ vecs) / s
        vh = vecs.T
    else:  # vecs are U_r [m, r]; Vh_r = U_rᵀ W / S_r
        u = vecs
        vh = (vecs.T @ wd) / s.unsqueeze(-1)
    return u.to(w.dtype), s.to(w.dtype), vh.contiguous().to(w.dtype)


def randomized_top_r(
    w: torch.Tensor,
    rank: int,
    *,
    niter: int,
    oversample: int,
    omega: torch.Tensor,
    tol: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` triple by a randomized range finder with power iterations.

    Early stop: in each iteration ``Wᵀ Q = Z R`` (the QR we need anyway) and the singular values of
    the small ``R [l, l]`` are those of ``Qᵀ W``, so ``e_k = Σ_{i≤r} σ_i(R)²`` is the top-r energy the
    current sketch captures, for free. When an iteration raises it by less than ``tol · e_k``, more
    iterations cannot help much (the gain shrinks geometrically) and the loop stops. Fast-decaying
    spectra (typical fp16/bf16 checkpoints) stop after 3–5 iterations; flat ones (quantised weights)
    run all ``niter``. The decision depends on the matrix and its seed only, so it is deterministic.

    Args:
        w: ``[m, n]`` or ``[b, m, n]``.
        rank: number of triples returned.
        niter: maximum power iterations (each costs two passes over ``w``).
        oversample: extra sketch columns; ``rank + oversample`` is capped at ``min(m, n)``.
        omega: Gaussian test matrix ``[.., n, l]`` with ``l >= rank`` (see :func:`gaussian_sketch`).
        tol: relative energy gain below which the iterations stop (0: run all ``niter``; a batch
            stops when every matrix in it would).
    """
    m, n = w.shape[-2], w.shape[-1]
    if rank + oversample >= min(m, n):
        # The sketch would span (almost) everything: the exact SVD is cheaper and exact.
        return exact_top_r(w, rank)
    wt = w.transpose(-2, -1)
    q = _orth(w @ omega)
    previous = None
    for _ in range(niter):
        z, r = torch.linalg.qr(wt @ q, mode="reduced")
        q = _orth(w @ z)
        if tol > 0:
            energy = torch.linalg.svdvals(r)[..., :rank].double().square().sum(dim=-1)
            if previous is not None and bool(((energy - previous) <= tol * energy).all()):
                break
            previous = energy
    b = q.transpose(-2, -1) @ w  # [.., l, n]
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    u = q @ ub
    return u[..., :rank], s[..., :rank], vh[..., :rank, :]


def gaussian_sketch(n: int, cols: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The seeded Gaussian test matrix ``[n, cols]`` (drawn in float32 on the CPU, then cast)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(n, cols, generator=gen, dtype=torch.float32).to(dtype)


def top_r_svd(
    w: torch.Tensor, rank: int, options: SvdOptions, seeds: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD of ``w`` (``[m, n]`` or ``[b, m, n]``) by ``options.method``.

    Args:
        w: the matrix or batch, any float dtype/device; computed in ``options.precision``.
        rank: number of singular triples.
        options: method and its parameters.
        seeds: one seed per matrix (randomized only; default 0 for each).

    Returns:
        ``(U, S, Vh)`` in ``options.precision`` on ``w``'s device.
    """
    w = w.to(options.torch_dtype)
    if options.method == "exact":
        return exact_top_r(w, rank)
    batch = w.shape[:-2]
    count = int(torch.tensor(batch).prod().item()) if batch else 1
    seeds = seeds if seeds is not None else [0] * count
    if len(seeds) != count:
        raise ValueError(f"need {count} seeds, got {len(seeds)}")
    n = w.shape[-1]
    cols = min(rank + options.oversample, min(w.shape[-2], n))
    omegas = [gaussian_sketch(n, cols, s, options.torch_dtype) for s in seeds]
    omega = (omegas[0] if not batch else torch.stack(omegas).reshape(*batch, n, cols)).to(w.device)
    return randomized_top_r(w, rank, niter=options.niter, oversample=options.oversample, omega=omega, tol=options.tol)
