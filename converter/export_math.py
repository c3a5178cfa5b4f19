"""PiSSA → LoRA export maths: tensors in, tensors out, nothing about files.

Notation (PEFT's orientation): ``A [r, in]``, ``B [out, r]``, scaling ``s`` (``alpha / r`` or
``alpha / √r`` with rsLoRA). The bundle stores ``W_res = W − s·B₀A₀``; training moves the adapter to
``(A′, B′)``. The fine-tuned model is ``W_res + s·B′A′ = W + ΔW`` with::

    ΔW = s·(B′A′ − B₀A₀) = s·[B′, −B₀] · [A′; A₀]

Exact export (:func:`exact_delta_factors`): ``lora_A = [A′; A₀]`` (2r rows), ``lora_B = [B′, −B₀]``,
rank 2r, and ``lora_alpha`` doubled (``√2·alpha`` with rsLoRA) so that the exported scaling equals
``s``: ``2α / 2r = α / r`` and ``√2α / √(2r) = α / √r``. This is exactly what PEFT's
``LoraModel.subtract_mutated_init`` does (``torch.cat`` along the rank axis, init second, B₀ negated).

Compressed export (:func:`delta_svd` + :func:`truncate_delta`): with ``C = [B′, −B₀]`` (out × 2r) and
``D = [A′; A₀]`` (2r × in), take reduced QRs ``C = Q_c R_c`` and ``Dᵀ = Q_d R_d``; then::

    ΔW = s · Q_c (R_c R_dᵀ) Q_dᵀ,      R_c R_dᵀ = U_m Σ V_mᵀ  (a 2r × 2r SVD)
    ΔW = (Q_c U_m) · (s·Σ) · (Q_d V_m)ᵀ

an exact thin SVD of ΔW whose cost is O((out + in)·r² + r³): the dense out × in product is never
formed. Keeping the top K triples gives the best rank-K approximation (Eckart–Young), with relative
Frobenius error ``√(Σ_{i>K} σ_i²) / √(Σ_i σ_i²)``, which is exact, not an estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# The values vLLM accepts for --max-lora-rank.
VLLM_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def exported_alpha(alpha: float, use_rslora: bool) -> float:
    """``lora_alpha`` of the exact (rank-2r) export that keeps the scaling unchanged.

    ``alpha / r → 2·alpha / 2r``; with rsLoRA ``alpha / √r → √2·alpha / √(2r)``. Same rule as PEFT.
    """
    return alpha * 2**0.5 if use_rslora else alpha * 2


def exact_delta_factors(
    lora_a: torch.Tensor, lora_b: torch.Tensor, init_a: torch.Tensor, init_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact rank-2r factors of ``B′A′ − B₀A₀``: ``([A′; A₀], [B′, −B₀])``.

    Args:
        lora_a: trained ``A′ [r, in]``.
        lora_b: trained ``B′ [out, r]``.
        init_a: initial ``A₀ [r, in]``.
        init_b: initial ``B₀ [out, r]``.

    Returns:
        ``(A [2r, in], B [out, 2r])`` in the trained adapter's dtypes, with ``B A = B′A′ − B₀A₀``.

    Raises:
        ValueError: the four shapes do not describe the same layer at the same rank.
    """
    _check_shapes(lora_a, lora_b, init_a, init_b)
    a = torch.cat([lora_a, init_a.to(lora_a.dtype)], dim=0)
    b = torch.cat([lora_b, -init_b.to(lora_b.dtype)], dim=1)
    return a.contiguous(), b.contiguous()


def _check_shapes(lora_a: torch.Tensor, lora_b: torch.Tensor, init_a: torch.Tensor, init_b: torch.Tensor) -> None:
    if lora_a.dim() != 2 or lora_b.dim() != 2:
        raise ValueError(f"lora_A and lora_B must be matrices, got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
    if lora_a.shape != init_a.shape or lora_b.shape != init_b.shape:
        raise ValueError(
            f"trained shapes A{tuple(lora_a.shape)} B{tuple(lora_b.shape)} differ from the initial "
            f"A{tuple(init_a.shape)} B{tuple(init_b.shape)}"
        )
    if lora_a.shape[0] != lora_b.shape[1]:
        raise ValueError(f"rank mismatch: lora_A {tuple(lora_a.shape)} vs lora_B {tuple(lora_b.shape)}")


@dataclass(frozen=True)
class DeltaSvd:
    """Thin SVD of one layer's ``ΔW = U diag(S) Vh`` (scaling included), float64 by default.

    Attributes:
        u: ``[out, k]`` orthonormal columns, ``k = 2r`` (or fewer when out/in are smaller).
        s: ``[k]`` singular values of ΔW, descending.
        vh: ``[k, in]`` orthonormal rows.
    """

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor

    def rel_error(self, rank: int) -> float:
        """Relative Frobenius error ``‖ΔW − ΔW_K‖ / ‖ΔW‖`` of keeping ``rank`` triples (0 if ΔW = 0)."""
        sq = self.s.double().square()
        total = float(sq.sum())
        if total == 0.0:
            return 0.0
        tail = float(sq[rank:].sum())
        return math.sqrt(max(tail, 0.0) / total)


def delta_svd(
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    init_a: torch.Tensor,
    init_b: torch.Tensor,
    scaling: float,
    *,
    dtype: torch.dtype = torch.float64,
) -> DeltaSvd:
    """Thin SVD of ``ΔW = s·(B′A′ − B₀A₀)`` from the factors (QR of both sides, SVD of the core).

    Args:
        lora_a, lora_b: trained factors ``A′ [r, in]``, ``B′ [out, r]``.
        init_a, init_b: initial factors ``A₀``, ``B₀``.
        scaling: the adapter's scaling ``s``.
        dtype: precision of the factorisation (float64: the errors reported are not polluted by
            float32 rounding when ΔW is small relative to the factors).

    Returns:
        A :class:`DeltaSvd` with ``U diag(S) Vh = ΔW``.
    """
    _check_shapes(lora_a, lora_b, init_a, init_b)
    c = torch.cat([lora_b, -init_b], dim=1).to(dtype)  # [out, 2r]
    d = torch.cat([lora_a, init_a], dim=0).to(dtype)  # [2r, in]
    q_c, r_c = torch.linalg.qr(c, mode="reduced")  # [out, k1], [k1, 2r]
    q_d, r_d = torch.linalg.qr(d.transpose(0, 1), mode="reduced")  # [in, k2], [k2, 2r]
    core = r_c @ r_d.transpose(0, 1)  # [k1, k2]
    u_m, sigma, vh_m = torch.linalg.svd(core, full_matrices=False)
    # Singular values below the rounding floor of the products are noise: a ΔW that is exactly zero
    # (an untrained adapter) must come out as zero, not as a spectrum of rounding errors.
    floor = max(c.shape[0], d.shape[1]) * torch.finfo(dtype).eps * float(c.norm() * d.norm())
    sigma = torch.where(sigma > floor, sigma, torch.zeros_like(sigma))
    return DeltaSvd(u=q_c @ u_m, s=sigma * scaling, vh=vh_m @ q_d.transpose(0, 1))


def truncate_delta(
    svd: DeltaSvd, rank: int, scaling: float, *, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors of the best rank-``rank`` approximation of ΔW for an adapter with scaling ``scaling``.

    ``B = U_K √(S_K / s)``, ``A = √(S_K / s) Vh_K`` so that ``s·B A = U_K diag(S_K) Vh_K``. When ΔW has
    fewer than ``rank`` singular triples (a layer narrower than 2r) the factors are zero-padded to
    ``rank``, so every layer of an adapter can share one rank and still represent its ΔW exactly.

    Returns:
        ``(A [rank, in], B [out, rank])`` in ``dtype``.
    """
    keep = min(rank, svd.s.shape[0])
    root = torch.sqrt(svd.s[:keep] / scaling)
    b = svd.u[:, :keep] * root.unsqueeze(0)
    a = root.unsqueeze(1) * svd.vh[:keep]
    if keep < rank:
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - keep)], dim=1)
        a = torch.cat([a, a.new_zeros(rank - keep, a.shape[1])], dim=0)
    return a.to(dtype).contiguous(), b.to(dtype).contiguous()


def pick_auto_rank(errors_by_rank: dict[int, float], tol: float) -> int | None:
    """Smallest rank whose worst-layer relative error is ``<= tol`` (``None`` if none is).

    Args:
        errors_by_rank: ``{rank: worst-layer relative error}``, e.g. over :data:`VLLM_LORA_RANKS`.
        tol: the tolerance.
    """
    for rank in sorted(errors_by_rank):
        if errors_by_rank[rank] <= tol:
            return rank
    return None
