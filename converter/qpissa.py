"""QPiSSA: a PiSSA adapter fitted to an NF4-quantized residual. Tensors in, tensors out, no files.

With ``W [out, in]`` in float32, rank ``r``, LoRA scaling ``s`` and ``NF4`` the bitsandbytes
blockwise 4-bit NormalFloat quantizer (``deq`` its dequantization), the stored pair is a quantized
residual ``Q`` and an adapter ``(A, B)`` with ``W ≈ deq(Q) + s·B A``. The iteration (PiSSA
paper §4, the authors' ``init_qpissa`` script; LoftQ's alternation started from PiSSA)::

    (A₀, B₀)   = PiSSA(W)                           top-r SVD of W
    for t = 1..T:
        Q_t        = NF4(W − s·B_{t−1} A_{t−1})     quantized from float32
        (A_t, B_t) = PiSSA(W − deq(Q_t))            top-r SVD of what Q_t misses
        e_t        = ‖W − (deq(Q_t) + s·B_t A_t)‖_*
    return the iterate with the smallest e_t

With the randomized SVD each refit starts its Krylov space from the previous adapter's right
subspace (``lora_Aᵀ``; :func:`converter.svd.top_r_svd`'s ``start``): ``W − deq(Q_t)`` is that
adapter's part plus quantization noise, so the first block is nearly converged and the early stop
comes after the second (2.1 blocks per refit over SmolLM2's matrices against 3.3 from a Gaussian
start; Σ error at T = 1 the same to 1e-6 relative, later iterates' sums to ~1e-4, as re-quantizing
amplifies the SVDs' tolerance-level differences).

For a fixed ``Q`` the truncated SVD of ``W − deq(Q)`` is the best rank-r adapter in every unitarily
invariant norm (Eckart–Young–Mirsky), nuclear included, so each ``(A_t, B_t)`` is optimal for its
``Q_t``; re-quantizing is not monotone, hence the best iterate is kept (``T = 1`` is therefore never
better than any ``T > 1`` with the same inputs: iterate 1 is the same in both). QLoRA's starting
point quantizes the whole weight and starts from a zero adapter: ``e_QLoRA = ‖W − deq(NF4(W))‖_*``.
Because the principal directions (the large-magnitude part) leave the residual before it is
quantized, the residual's blocks have smaller absmax and NF4 rounds them more finely.

Nuclear norms are computed as ``Σ √λ_i(X Xᵀ)`` on the short side of X in float32, summed in float64
(eigenvalues only: about 5× faster than ``svdvals`` on CPU, and these norms were half of QPiSSA's
cost). On CPU the Gram matrix is one BLAS ``ssyrk`` (its upper triangle only: half a matmul's
flops) and its eigenvalues LAPACK's ``ssyevd``, both through scipy, ~40% less time than torch's
``mm`` + ``eigvalsh`` on SmolLM2's shapes. On SmolLM2's quantization errors this agrees with a
float64 ``svdvals`` to < 4e-7 relative, while the iterates and QLoRA differ by percents.

NF4 on CPU: bitsandbytes 0.50 quantizes with a generic torch kernel (``torch.bucketize`` over the 15
midpoints of the code book) that cost ~17 ms per SmolLM2 MLP matrix, and importing bitsandbytes costs
~4 s (it ``torch.compile``-wraps its kernels, which imports dynamo and inductor). :func:`quantize`
therefore does the same arithmetic itself for the common case (NF4, no double quantization, CPU,
rows a whole number of blocks): the same absmax, the same ``clamp(x · (1 / absmax), -1, 1)``, and
the index ``#{midpoints < x}`` from a 1024-cell lookup table plus one exact comparison per value,
then ``deq = code[q] · absmax``. The packed bytes, absmax and ``deq`` are bitwise bitsandbytes'
(``tests/test_qpissa.py`` checks them against ``quantize_4bit`` / ``dequantize_4bit``, ties at the
midpoints included). Other cases (double quantization, other devices, rows that are not a whole
number of blocks, where bitsandbytes' CPU dequantization blocks per row) call bitsandbytes.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

from converter.factorize import pissa_split
from converter.options import QUANT_BLOCKSIZES, QUANT_TYPES, QuantOptions
from converter.svd import SvdOptions
from pissa.core.errors import MissingDependencyError

__all__ = [
    "NF4_CODE", "QUANT_BLOCKSIZES", "QUANT_TYPES", "QPissaSplit", "QuantOptions", "Quantized", "check_bitsandbytes",
    "error_norms", "nuclear_norm", "qlora_error", "qpissa_split", "quantize", "require_bitsandbytes",
]


def require_bitsandbytes() -> Any:
    """``bitsandbytes.functional``, or :class:`MissingDependencyError` when it is not installed."""
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError as exc:
        raise _missing() from exc
    return bnb_functional


def check_bitsandbytes() -> None:
    """:class:`MissingDependencyError` unless bitsandbytes is installed, without importing it (~4 s)."""
    import sys

    if "bitsandbytes" in sys.modules:  # imported, or blocked (None: what an uninstalled package looks like to tests)
        found = sys.modules["bitsandbytes"] is not None
    else:
        found = _installed("bitsandbytes")
    if not found:
        raise _missing()


@functools.cache
def _installed(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _missing() -> MissingDependencyError:
    return MissingDependencyError("bitsandbytes", extra="quant", purpose="to quantize the residual to NF4")


# bitsandbytes' NF4 code book (bitsandbytes.functional.get_4bit_type("nf4"); the test compares them).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
_CELLS = 1024  # lookup cells over [-1, 1]; 2/1024 is far below the smallest gap between midpoints (0.08)
_SLACK = 1e-6  # ≫ the rounding of the cell index (one float32 ulp of 1, 1.2e-7)
_tables: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _nf4_tables() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The code book, and per cell ``c`` (values in ``[e_c, e_{c+1})``, ``e_c = -1 + 2c/CELLS``):
    ``below[c] = #{midpoints < e_c − slack}`` (uint8) and ``edge[c]`` the one midpoint in
    ``[e_c − slack, e_{c+1} + slack)`` (+inf if none). For x in cell c (up to the rounding of the
    index, ≪ slack) ``#{midpoints < x} = below[c] + (x > edge[c])`` exactly, which is what
    ``torch.bucketize(x, midpoints)`` (bitsandbytes' kernel) returns."""
    if "nf4" not in _tables:
        code = torch.tensor(NF4_CODE, dtype=torch.float32)
        mids = (code[:-1] + code[1:]) / 2  # float32, as bitsandbytes forms them
        lo = -1 + 2 * torch.arange(_CELLS, dtype=torch.float64) / _CELLS - _SLACK
        hi = lo + 2 / _CELLS + 2 * _SLACK
        m = mids.double()
        below = (m.unsqueeze(0) < lo.unsqueeze(1)).sum(dim=1).to(torch.uint8)
        inside = (m.unsqueeze(0) >= lo.unsqueeze(1)) & (m.unsqueeze(0) < hi.unsqueeze(1))
        assert int(inside.sum(dim=1).max()) <= 1
        edge = torch.full((_CELLS,), float("inf"), dtype=torch.float32)
        rows, cols = inside.nonzero(as_tuple=True)
        edge[rows] = mids[cols]
        _tables["nf4"] = (code, below, edge)
    return _tables["nf4"]


def _fast_path(x: torch.Tensor, options: QuantOptions) -> bool:
    return (
        options.quant_type == "nf4" and not options.double_quant and x.device.type == "cpu" and x.dim() == 2
        and x.shape[-1] % options.blocksize == 0
    )


def _nf4_cpu(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bitsandbytes' CPU ``quantize_4bit`` (NF4) and ``dequantize_4bit``, bitwise: (packed, absmax, deq).

    The codes stay uint8 throughout: the table lookup, and the comparison added as its uint8 view
    (adding a bool tensor to an integer one takes a type-promoting path ~40× slower on CPU)."""
    code, below, edge = _nf4_tables()
    blocks = x.reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=-1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    cell = scaled.add(1).mul_(_CELLS / 2).to(torch.int32).clamp_(0, _CELLS - 1)
    q8 = below.index_select(0, cell).add_(torch.gt(scaled, edge.index_select(0, cell)).view(torch.uint8))
    packed = ((q8[::2] << 4) | q8[1::2]).unsqueeze(1)
    deq = code.index_select(0, q8.to(torch.int32)).view(-1, blocksize).mul_(absmax.view(-1, 1)).reshape(x.shape)
    return packed, absmax, deq


@dataclass(frozen=True)
class Quantized:
    """Output of :func:`quantize`: the packed tensor, its absmax and code book, and deq(Q) in float32."""

    packed: torch.Tensor  # uint8 [numel / 2, 1]
    absmax: torch.Tensor  # float32 [blocks] (uint8 with double quantization)
    dequantized: torch.Tensor  # float32, shape of the input
    options: QuantOptions
    shape: tuple[int, ...]
    bnb_state: Any = None  # bitsandbytes' QuantState when bitsandbytes quantized

    @property
    def state(self) -> Any:
        """bitsandbytes' ``QuantState`` of Q (built on demand when Q was quantized here; imports bitsandbytes)."""
        if self.bnb_state is None:
            functional = require_bitsandbytes()
            state = functional.QuantState(
                absmax=self.absmax, shape=torch.Size(self.shape), dtype=torch.float32, blocksize=self.options.blocksize,
                code=torch.tensor(NF4_CODE, dtype=torch.float32), quant_type=self.options.quant_type,
            )
            object.__setattr__(self, "bnb_state", state)
        return self.bnb_state

    @property
    def code(self) -> torch.Tensor:
        """The code book (``quant_map``)."""
        return self.bnb_state.code if self.bnb_state is not None else torch.tensor(NF4_CODE, dtype=torch.float32)


def quantize(w: torch.Tensor, options: QuantOptions) -> Quantized:
    """``Q = NF4(w)`` from float32 as bitsandbytes computes it, and ``deq(Q)`` in float32.

    Raises:
        InvalidOptionsError: unsupported quant type or blocksize (checked before bitsandbytes is used).
        MissingDependencyError: bitsandbytes is not installed.
    """
    options.validate()
    x = w.to(torch.float32).contiguous()
    if _fast_path(x, options):
        check_bitsandbytes()
        packed, absmax, deq = _nf4_cpu(x, options.blocksize)
        return Quantized(packed, absmax, deq, options, tuple(x.shape))
    functional = require_bitsandbytes()
    packed, state = functional.quantize_4bit(
        x, blocksize=options.blocksize, quant_type=options.quant_type, compress_statistics=options.double_quant
    )
    deq = functional.dequantize_4bit(packed, state).to(torch.float32).reshape(x.shape)
    return Quantized(packed, state.absmax, deq, options, tuple(x.shape), state)


def nuclear_norm(x: torch.Tensor) -> float:
    """``‖x‖_* = Σ σ_i(x)`` of a matrix, from the eigenvalues of its small Gram matrix (float32 maths,
    float64 sum; relative error ~1e-7 for the well-spread spectra of quantization errors)."""
    return error_norms(x)[0]


def error_norms(x: torch.Tensor) -> tuple[float, float]:
    """``(‖x‖_*, ‖x‖_F)`` from one Gram matrix ``G`` of the short side: ``Σ √λ_i(G)`` and ``√tr G``
    (float32 maths, float64 sums)."""
    xf = x.detach().to(torch.float32)
    if xf.device.type == "cpu":
        import numpy as np
        from scipy.linalg import blas, eigvalsh

        # A C-contiguous [m, n] array is the Fortran-contiguous [n, m] array aᵀ: no copy for BLAS.
        at = xf.contiguous().numpy().T
        gram = blas.ssyrk(1.0, at, trans=1 if xf.shape[0] <= xf.shape[1] else 0)  # upper triangle of x xᵀ or xᵀ x
        trace = float(np.diagonal(gram).astype(np.float64).sum())
        ev = eigvalsh(gram, lower=False, overwrite_a=True, check_finite=False, driver="evd")
        return float(np.sqrt(np.clip(ev.astype(np.float64), 0, None)).sum()), math.sqrt(max(trace, 0.0))
    return _error_norms_torch(xf)


def _error_norms_torch(xf: torch.Tensor) -> tuple[float, float]:
    """:func:`error_norms` in torch (any device)."""
    gram = xf @ xf.T if xf.shape[0] <= xf.shape[1] else xf.T @ xf
    trace = float(torch.diagonal(gram).to(torch.float64).sum())
    return float(torch.linalg.eigvalsh(gram).to(torch.float64).clamp_min(0).sqrt().sum()), math.sqrt(max(trace, 0.0))


@dataclass(frozen=True)
class QPissaSplit:
    """Result of :func:`qpissa_split` for one matrix ``[out, in]`` (nn.Linear orientation).

    ``errors[t-1]`` is ``e_t``; ``best`` is the kept iterate ``t`` (1-based) and ``error`` its ``e_t``.
    """

    lora_A: torch.Tensor  # [r, in], float32
    lora_B: torch.Tensor  # [out, r], float32
    quantized: Quantized  # Q of the kept iterate
    error: float  # ‖W − (deq(Q) + s·B A)‖_* of the kept iterate
    qlora_error: float  # ‖W − deq(NF4(W))‖_*
    errors: tuple[float, ...]  # e_1 .. e_T
    best: int
    error_fro: float  # ‖W − (deq(Q) + s·B A)‖_F of the kept iterate (float32 maths)

    @property
    def ratio(self) -> float:
        """QPiSSA error over QLoRA error (below 1: less quantization error than QLoRA)."""
        return self.error / self.qlora_error if self.qlora_error > 0 else 0.0


def qpissa_split(
    weight: torch.Tensor,
    *,
    rank: int,
    scaling: float,
    svd: SvdOptions,
    quant: QuantOptions,
    seed: int = 0,
    with_qlora_error: bool = True,
) -> QPissaSplit:
    """PiSSA split, then ``quant.iters`` refinements against NF4 (see the module docstring).

    Args:
        weight: ``[out, in]`` (any float dtype; all maths in float32, quantization from float32).
        rank: adapter rank ``r``.
        scaling: LoRA scaling ``s``.
        svd: how every top-r SVD is computed (the project's :func:`converter.svd.top_r_svd`).
        quant: quant type, blocksize, ``T``, double quantization.
        seed: seed of the randomized sketches (the same for every refinement of this matrix).
        with_qlora_error: also compute QLoRA's error (one more quantization and nuclear norm).

    Raises:
        InvalidOptionsError: unsupported quant type, blocksize or iteration count.
        MissingDependencyError: bitsandbytes is not installed.
        ValueError: rank out of range; NonFiniteError: the weight holds NaN or Inf.
    """
    quant.validate()
    check_bitsandbytes()  # fail before any SVD when bitsandbytes is missing
    w = weight.to(torch.float32)
    seeds = [seed]
    split = pissa_split(w, rank=rank, scaling=scaling, svd=svd, seeds=seeds)
    target = split.residual  # W − s·B₀A₀ (float32 residual: no cast, exact)
    start = split.lora_A.T  # each refit's SVD starts from the previous adapter's right subspace
    best: tuple[float, int, torch.Tensor, torch.Tensor, Quantized, float] | None = None
    errors: list[float] = []
    for t in range(1, quant.iters + 1):
        q = quantize(target, quant)
        refit = pissa_split(
            torch.sub(w, q.dequantized), rank=rank, scaling=scaling, svd=svd, seeds=seeds, start=start, overwrite=True
        )
        # refit.residual = W − deq(Q) − s·BA: the reconstruction error itself.
        err, fro = error_norms(refit.residual)
        errors.append(err)
        if best is None or err < best[0]:
            best = (err, t, refit.lora_A, refit.lora_B, q, fro)
        if t < quant.iters:
            target = refit.residual.add_(q.dequantized)  # W − s·B_t A_t
            start = refit.lora_A.T
    assert best is not None
    qlora = qlora_error(w, quant) if with_qlora_error else float("nan")
    err, t_best, lora_a, lora_b, q_best, fro = best
    return QPissaSplit(
        lora_A=lora_a, lora_B=lora_b, quantized=q_best, error=err, qlora_error=qlora, errors=tuple(errors),
        best=t_best, error_fro=fro,
    )


def qlora_error(w: torch.Tensor, quant: QuantOptions) -> float:
    """QLoRA's starting error ``‖W − deq(NF4(W))‖_*`` (``w`` in float32), formed in ``deq(NF4(W))``'s own buffer.

    Raises:
        InvalidOptionsError: unsupported quant type or blocksize.
        MissingDependencyError: bitsandbytes is not installed.
    """
    return nuclear_norm(quantize(w, quant).dequantized.neg_().add_(w))
