"""The PiSSA split of one weight matrix (or a batch of same-shaped ones): tensors in, tensors out.

With ``W [out, in]`` in float32, ``U S Vh`` its top-r SVD and ``s`` the LoRA scaling
(``alpha / r``, or ``alpha / √r`` with rsLoRA), PEFT's convention is::

    lora_B = U_r · diag(√(S_r / s))        [out, r]
    lora_A = diag(√(S_r / s)) · Vh_r       [r, in]
    W_res  = W − s · lora_B @ lora_A       (cast back to the residual dtype)

so that ``W_res + s · B A = W``. We form ``W_res`` from the adapter *as stored* (after casting it
to the adapter dtype), so the pair reproduces W up to the rounding of the residual dtype alone,
whatever the adapter dtype. Conv1D layers (GPT-2) store ``Wᵀ``: pass ``fan_in_fan_out=True`` and
the residual comes back in the stored orientation; the adapter is always in nn.Linear orientation.

Statistics recorded per matrix:
- ``energy``: the adapter's share of ``‖W‖_F²``, i.e. ``Σ_{i≤r} S_i² / ‖W‖_F²`` (for an exact SVD
  this is the best possible; tests divide it by the exact top-r share to get the *captured* ratio).
- ``rel_error``: ``‖W − (W_res + s·B A)‖_F / ‖W‖_F`` computed after every cast, in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from converter.svd import SvdOptions, top_r_svd


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's scaling: ``alpha / r`` or, with rsLoRA, ``alpha / √r``."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class NonFiniteError(ValueError):
    """The weight holds NaN or Inf (callers name the tensor)."""


@dataclass(frozen=True)
class PissaSplit:
    """Result of :func:`pissa_split` (batched like the input)."""

    lora_A: torch.Tensor  # [.., r, in], adapter dtype
    lora_B: torch.Tensor  # [.., out, r], adapter dtype
    residual: torch.Tensor  # stored orientation and residual dtype
    energy: torch.Tensor  # [..] float64
    rel_error: torch.Tensor  # [..] float64


def pissa_split(
    weight: torch.Tensor,
    *,
    rank: int,
    scaling: float,
    svd: SvdOptions,
    seeds: list[int] | None = None,
    fan_in_fan_out: bool = False,
    adapter_dtype: torch.dtype = torch.float32,
    residual_dtype: torch.dtype | None = None,
    start: torch.Tensor | None = None,
    overwrite: bool = False,
) -> PissaSplit:
    """Split ``weight`` into a PiSSA adapter and residual.

    Args:
        weight: ``[out, in]`` (``[in, out]`` if ``fan_in_fan_out``), or a batch ``[b, ...]`` of those.
        rank: adapter rank ``r``; must be ``<= min(out, in)``.
        scaling: LoRA scaling ``s`` (see :func:`lora_scaling`).
        svd: how the top-r SVD is computed.
        seeds: per-matrix seeds of the randomized sketch.
        fan_in_fan_out: the stored tensor is ``Wᵀ`` (transformers' Conv1D).
        adapter_dtype: dtype of lora_A / lora_B.
        residual_dtype: dtype of the residual (default: ``weight.dtype``).
        start: a warm start for the randomized SVD (see :func:`converter.svd.top_r_svd`), in
            nn.Linear orientation: ``[.., in, l]``, e.g. a previous ``lora_Aᵀ``.
        overwrite: ``weight`` is a temporary of the caller's: when it is in the SVD's dtype, the
            residual is formed in place in it (``residual`` may then be ``weight`` itself) instead of
            in a copy; in any other dtype it is copied and left untouched as usual.

    Raises:
        ValueError: rank out of range, or a ``start`` that does not fit.
        NonFiniteError: the weight holds NaN or Inf; found from ‖W‖², so finite weights cost no
            extra pass.
    """
    residual_dtype = residual_dtype or weight.dtype
    # One private float copy of the stored tensor (or, with ``overwrite``, the caller's temporary
    # itself); the residual is formed in place in it. Fresh buffers the size of W cost page faults
    # (a third of the conversion's CPU time on a 1 GB checkpoint when pissa_split allocated four of
    # them per matrix), so this makes at most one.
    stored = weight.to(svd.torch_dtype, copy=not (overwrite and weight.dtype == svd.torch_dtype))
    w = stored.transpose(-2, -1) if fan_in_fan_out else stored  # [.., out, in] view
    out_f, in_f = w.shape[-2], w.shape[-1]
    if not 1 <= rank <= min(out_f, in_f):
        raise ValueError(f"rank {rank} is out of range for a [{out_f}, {in_f}] matrix")
    # ‖W‖² from row norms (no temporary the size of W), accumulated in float64: ~1e-7 relative.
    norm_sq = torch.linalg.vector_norm(stored, dim=-1).double().square().sum(dim=-1)
    if not bool(torch.isfinite(norm_sq).all()):
        if not bool(torch.isfinite(stored).all()):
            raise NonFiniteError("weight contains NaN or Inf")
        norm_sq = stored.double().square().sum(dim=(-2, -1))  # float32 squares overflowed

    u, s, vh = top_r_svd(w, rank, svd, seeds, start=start)
    root = torch.sqrt(s / scaling)  # [.., r]
    lora_b = (u * root.unsqueeze(-2)).to(adapter_dtype)
    lora_a = (root.unsqueeze(-1) * vh).to(adapter_dtype)
    energy = (s.double().square().sum(dim=-1) / norm_sq).clamp(max=1.0)

    # The residual is taken against the adapter as stored, so only its own cast rounds:
    # D = W − s·B A in place in one BLAS call (in the stored orientation: Wᵀ − s·AᵀBᵀ for Conv1D),
    # W_res = D cast, and the reconstruction error ‖W − (W_res + s·BA)‖ = ‖D − W_res‖.
    b_w, a_w = lora_b.to(w.dtype), lora_a.to(w.dtype)
    if fan_in_fan_out:
        b_w, a_w = a_w.transpose(-2, -1), b_w.transpose(-2, -1)
    d = stored.baddbmm_(b_w, a_w, alpha=-scaling) if stored.dim() > 2 else stored.addmm_(b_w, a_w, alpha=-scaling)
    res = d.to(residual_dtype)
    if res.dtype == d.dtype:  # no cast, no rounding (and res is d itself)
        rel_error = torch.zeros_like(norm_sq)
    else:
        rel_error = torch.linalg.vector_norm(d.sub_(res), dim=(-2, -1)).double() / norm_sq.sqrt()

    return PissaSplit(
        lora_A=lora_a.contiguous(),
        lora_B=lora_b.contiguous(),
        residual=res.contiguous(),
        energy=energy,
        rel_error=rel_error,
    )
