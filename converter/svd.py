"""Truncated SVD, exact or randomized: tensors in, tensors out, nothing about files.

All functions accept a single matrix ``[m, n]`` or a batch of same-shaped matrices ``[b, m, n]``
and return the top-``rank`` triple ``U [.., m, r]``, ``S [.., r]`` (descending), ``Vh [.., r, n]``
with ``W ≈ U diag(S) Vh``.

Randomized method: block Krylov range finder with Rayleigh–Ritz (Halko, Martinsson & Tropp 2011
§4.6; Musco & Musco 2015), run on the short side of W: ``A = W`` if ``m <= n`` else ``Wᵀ``, ``A`` is
``[k, N]``::

    Ω ~ N(0, 1)^{n × l},  l = r + p                (block size; p = oversampling, default 0)
    Q₀ = orth(A Ω)   (tall W: Q₀ = orth(Ω), Ω already lives on the short side)
    for j = 0, 1, ...:   Z_j = Aᵀ Q_j                           (one pass over W)
                         Q_{j+1} = orth((I − QQᵀ)² A Z_j)         (one pass; Q = [Q₀ … Q_j])
    K = [Q₀ … Q_q]  spans  {A Ω, (AAᵀ) A Ω, …, (AAᵀ)^q A Ω},   B = Kᵀ A = [Z₀ … Z_q]ᵀ
    G = B Bᵀ = Ũ Λ Ũᵀ (float64, [(q+1)l]²);  S = √Λ,  U_A = K Ũ,  V_Aᵀ = S⁻¹ Ũᵀ B;  keep the first r

Unlike subspace (power) iteration, which keeps only the last block ``(AAᵀ)^q A Ω``, the whole
Krylov space is kept and the best rank-r approximation inside it is taken: its error decays like
a Chebyshev polynomial of degree ``q`` in the spectrum instead of ``(σ_{l+1}/σ_r)^{2q+1}``, i.e. with
the square root of the gap, so flat spectra (real and quantised weights) converge in far fewer
passes over W and a block of ``l = r`` is enough. ``B`` needs no extra pass: its rows are the
``Z_j`` computed anyway, and so is the Gram matrix ``G`` that gives the top-r energy for the early
stop after every block. Each new block is orthogonalised against the whole basis twice (classical
Gram–Schmidt twice is enough in floating point), then QR'd. On SmolLM2's 210 matrices this captures
more of the top-r energy than the previous subspace iteration (l = r + 16) at about 0.6× its
single-thread CPU time (bench/svd_micro.py).

PEFT's ``pissa_niter_N`` calls ``torch.svd_lowrank(q=r)``, i.e. subspace iteration with p = 0, which
is why it captures less of the principal energy at equal cost. Ω is drawn from a generator seeded
per matrix, so results do not depend on which process or batch handled a matrix.
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
        method: ``exact`` (the top-r eigenpairs of the Gram matrix ``WWᵀ`` or ``WᵀW`` in float64,
            then the other factor by one product; a full float64 SVD on non-CPU devices, for
            r > min(m, n)/2 and for nearly rank-deficient W: see :func:`exact_top_r`) or
            ``randomized`` (block Krylov range finder, see the module docstring).
        niter: maximum Krylov steps of the randomized method (each adds a block and costs two
            passes over W).
        oversample: extra columns ``p`` of the randomized sketch, i.e. block size ``l = r + p``.
            Block Krylov needs none (the space grows by a block per step); measured on SmolLM2
            and a synthetic Llama (bench/svd_micro.py), p = 0 is the cheapest at equal accuracy.
        precision: dtype the factorisation runs in (``float32`` or ``float64``).
        tol: stop early once a Krylov step raises the top-r energy of the space by less than
            ``tol`` of it (0: always run ``niter``); see :func:`randomized_top_r`. Krylov gains
            shrink fast, so what is left after the stop is of the order of ``tol``; 1e-3 keeps the
            worst SmolLM2 matrix above 0.999 of the exact top-16 energy.
    """

    method: SvdMethod = "randomized"
    niter: int = 10
    oversample: int = 0
    precision: Literal["float32", "float64"] = "float32"
    tol: float = 1e-3

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
    """Top-``rank`` triple by a randomized block Krylov range finder (see the module docstring).

    Early stop: after each block the top-r energy ``e_j = Σ_{i≤r} λ_i(G)`` of the Krylov space so far
    is known from its small Gram matrix ``G`` (needed for the final Rayleigh–Ritz step anyway). When
    a block raises it by less than ``tol · e_j`` the loop stops; the Ritz values grow monotonically
    and Krylov convergence is fast, so what is left is of the order of the last gain. Fast-decaying
    spectra stop after 2–4 blocks; flat ones run up to ``niter``. The decision depends on the matrix
    and ``omega`` only (its seed, or the warm start), so it is deterministic.

    Args:
        w: ``[m, n]`` or ``[b, m, n]``.
        rank: number of triples returned.
        niter: maximum Krylov steps; each adds one block of ``l`` vectors and costs two passes over
            ``w`` (at most ``niter + 1`` blocks, and never more than ``min(m, n)`` vectors).
        oversample: extra sketch columns; ``rank + oversample`` is capped at ``min(m, n)``.
        omega: the first block ``[.., n, l]`` with ``l >= rank``: a Gaussian test matrix (see
            :func:`gaussian_sketch`) or a warm start (:func:`top_r_svd`'s ``start``); ``l`` is the
            block size.
        tol: relative energy gain below which the iterations stop (0: run all ``niter``; a batch
            stops when every matrix in it would).
    """
    m, n = w.shape[-2], w.shape[-1]
    if rank + oversample >= min(m, n):
        # The sketch would span (almost) everything: the exact SVD is cheaper and exact.
        return exact_top_r(w, rank)
    tall = m > n
    # The Krylov space lives on the short side of W: A = W (wide) or Wᵀ (tall), A is [k, N], k <= N.
    a = w.transpose(-2, -1) if tall else w
    at = a.transpose(-2, -1)
    k, big = a.shape[-2], a.shape[-1]
    block = omega.shape[-1]
    batch = a.shape[:-2]
    eps = torch.finfo(a.dtype).eps
    blocks = max(1, min(niter + 1, k // block))
    kmax = blocks * block
    qs = a.new_empty(*batch, k, kmax)  # orthonormal Krylov basis Q, block by block
    zs = a.new_empty(*batch, big, kmax)  # Z = Aᵀ Q, i.e. B = Qᵀ A = Zᵀ
    zd = torch.empty(*batch, big, kmax, dtype=torch.float64, device=a.device)  # Z in float64, for the Gram matrix
    gram = torch.zeros(*batch, kmax, kmax, dtype=torch.float64, device=a.device)  # G = Zᵀ Z = Qᵀ A Aᵀ Q (lower part)
    # Block 0: Q₀ = orth(A Ω) for a wide W; for a tall one Ω already lives on the short side.
    qs[..., :block] = _orth(omega if tall else a @ omega)
    used = 0
    previous = None
    for j in range(blocks):
        lo, hi = j * block, (j + 1) * block
        zs[..., lo:hi] = at @ qs[..., lo:hi]
        zd[..., lo:hi] = zs[..., lo:hi]
        gram[..., lo:hi, :hi] = zd[..., lo:hi].transpose(-2, -1) @ zd[..., :hi]
        used = hi
        if tol > 0:
            energy = torch.linalg.eigvalsh(gram[..., :hi, :hi])[..., -rank:].sum(dim=-1)
            if previous is not None and bool(((energy - previous) <= tol * energy).all()):
                break
            previous = energy
        if j + 1 == blocks:
            break
        # Next block: A Aᵀ Q_j with the whole basis projected out twice ("twice is enough").
        y = a @ zs[..., lo:hi]
        scale = torch.linalg.vector_norm(y, dim=-2).amax(dim=-1)
        basis = qs[..., :hi]
        for _ in range(2):
            y = y - basis @ (basis.transpose(-2, -1) @ y)
        q, r = torch.linalg.qr(y, mode="reduced")
        if bool((torch.diagonal(r, dim1=-2, dim2=-1).abs().amin(dim=-1) <= eps**0.5 * scale).any()):
            # (Partial) breakdown: some of A Aᵀ Q_j already lies in the space (rank-deficient W), and
            # the columns QR normalised from rounding noise need not be orthogonal to it. Project
            # the unit-norm block once more and re-QR: those become arbitrary orthonormal
            # directions, harmless to the Rayleigh–Ritz step.
            q = torch.linalg.qr(q - basis @ (basis.transpose(-2, -1) @ q), mode="reduced")[0]
        qs[..., hi : hi + block] = q
    # Rayleigh–Ritz: A ≈ Q B with B = Zᵀ [K, N]; B Bᵀ = G = Ũ Λ Ũᵀ gives the SVD of B.
    g = gram[..., :used, :used]
    evals, evecs = torch.linalg.eigh(g)
    s = evals[..., -rank:].flip(-1).clamp_min(0).sqrt()
    top = evecs[..., -rank:].flip(-1)  # [.., K, r]
    basis, z = qs[..., :used], zs[..., :used]
    if bool(((s[..., -1] <= 1e-6 * s[..., 0]) | ~torch.isfinite(s).all(dim=-1)).any()):
        # (Nearly) rank-deficient: Vᵀ = S⁻¹ Ũᵀ B would divide by ~0; the SVD of B stays orthonormal.
        ub, sb, vbh = torch.linalg.svd(z.transpose(-2, -1), full_matrices=False)
        u_a, s_a, vh_a = basis @ ub[..., :rank], sb[..., :rank], vbh[..., :rank, :]
    else:
        u_a = basis @ top.to(a.dtype)
        vh_a = ((top.transpose(-2, -1) @ zd[..., :used].transpose(-2, -1)) / s.unsqueeze(-1)).to(a.dtype)
        s_a = s.to(a.dtype)
    if tall:  # W = Aᵀ ≈ V_A S U_Aᵀ
        return vh_a.transpose(-2, -1), s_a, u_a.transpose(-2, -1)
    return u_a, s_a, vh_a


def gaussian_sketch(n: int, cols: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The seeded Gaussian test matrix ``[n, cols]`` (drawn in float32 on the CPU, then cast)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(n, cols, generator=gen, dtype=torch.float32).to(dtype)


def top_r_svd(
    w: torch.Tensor,
    rank: int,
    options: SvdOptions,
    seeds: list[int] | None = None,
    start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD of ``w`` (``[m, n]`` or ``[b, m, n]``) by ``options.method``.

    Args:
        w: the matrix or batch, any float dtype/device; computed in ``options.precision``.
        rank: number of singular triples.
        options: method and its parameters.
        seeds: one seed per matrix (randomized only; default 0 for each).
        start: randomized only: ``[.., n, l]`` (``l >= rank``), a warm start used as the first Krylov
            block instead of the Gaussian sketch (then ``seeds`` are unused), e.g. ``Vh_rᵀ`` (or
            ``lora_Aᵀ``) of a matrix close to ``w``. When ``w``'s top-r right singular subspace is
            close to it, the first block is nearly converged and the early stop (``options.tol``)
            comes after the second or third. Ignored by the exact method, and when the randomized one
            falls back to it (``l >= min(m, n)``).

    Raises:
        ValueError: ``seeds`` or ``start`` do not fit ``w``.

    Returns:
        ``(U, S, Vh)`` in ``options.precision`` on ``w``'s device.
    """
    w = w.to(options.torch_dtype)
    if options.method == "exact":
        return exact_top_r(w, rank)
    if start is not None:
        if start.shape[:-1] != (*w.shape[:-2], w.shape[-1]) or start.shape[-1] < rank:
            raise ValueError(f"start {tuple(start.shape)} does not fit {tuple(w.shape)} at rank {rank}")
        omega = start.to(device=w.device, dtype=options.torch_dtype)
    else:
        omega = _seeded_sketch(w, rank, options, seeds)
    # The block's width past the rank is the oversampling (capped at min(m, n) for the seeded sketch).
    return randomized_top_r(w, rank, niter=options.niter, oversample=omega.shape[-1] - rank, omega=omega,
                            tol=options.tol)


def _seeded_sketch(w: torch.Tensor, rank: int, options: SvdOptions, seeds: list[int] | None) -> torch.Tensor:
    """The Gaussian first block ``[.., n, min(r + p, m, n)]`` of :func:`top_r_svd`, one seed per matrix."""
    batch = w.shape[:-2]
    count = int(torch.tensor(batch).prod().item()) if batch else 1
    seeds = seeds if seeds is not None else [0] * count
    if len(seeds) != count:
        raise ValueError(f"need {count} seeds, got {len(seeds)}")
    n = w.shape[-1]
    cols = min(rank + options.oversample, min(w.shape[-2], n))
    omegas = [gaussian_sketch(n, cols, s, options.torch_dtype) for s in seeds]
    return (omegas[0] if not batch else torch.stack(omegas).reshape(*batch, n, cols)).to(w.device)
