"""Options of a conversion, as one frozen dataclass validated with every problem reported at once."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from pissa.core.errors import InvalidOptionsError
from pissa.core.formats.dtypes import FLOAT_NAMES

DEVICES = ("cpu", "cuda")
SVD_METHODS = ("randomized", "exact")
# ``pissa export --rank auto``: the largest worst-layer relative error of ΔW accepted (the default of
# ``converter.export.export(tol=...)`` and of ``--tol``; here so the CLI reads it without importing torch).
EXPORT_TOL = 0.01

QUANT_TYPES = ("nf4",)
#: Block sizes bitsandbytes' 4-bit quantizer accepts on every backend (0.45–0.50; 32 works on CPU only).
QUANT_BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)


def _raise_problems(problems: list[str], what: str) -> None:
    if problems:
        raise InvalidOptionsError(f"invalid {what} options", problems, fix="correct the options above")


@dataclass(frozen=True)
class QuantOptions:
    """How a QPiSSA residual is quantized (converter/qpissa.py).

    Attributes:
        quant_type: only ``nf4``.
        blocksize: elements per absmax block (one of :data:`QUANT_BLOCKSIZES`).
        iters: refinements ``T`` (>= 1); the best iterate by nuclear error is kept.
        double_quant: quantize the absmax constants too (bitsandbytes' ``compress_statistics``).
    """

    quant_type: str = "nf4"
    blocksize: int = 64
    iters: int = 1
    double_quant: bool = False

    def problems(self) -> list[str]:
        """Every problem with these options (empty when valid)."""
        p: list[str] = []
        if self.quant_type not in QUANT_TYPES:
            p.append(f"--quantize must be one of {', '.join(QUANT_TYPES)}, got {self.quant_type!r}")
        if self.blocksize not in QUANT_BLOCKSIZES:
            p.append(
                f"--quant-blocksize {self.blocksize} is not supported by bitsandbytes: "
                f"use one of {', '.join(map(str, QUANT_BLOCKSIZES))} (64 is QLoRA's)"
            )
        if self.iters < 1:
            p.append(f"--quant-iters must be >= 1, got {self.iters}")
        return p

    def validate(self) -> QuantOptions:
        """Return self, or raise :class:`InvalidOptionsError` listing every problem."""
        _raise_problems(self.problems(), "quantization")
        return self


# Field metadata: which options decide what a bundle holds. A field without metadata is content, so
# a new option makes finished bundles and partial work stale until it says otherwise.
# How the work is run, never recorded: the same bundle whatever their values.
_RUN: dict[str, bool] = {"recorded": False, "content": False}
# Recorded in pissa.json (``pissa verify`` needs it) but the bundle's bytes do not depend on it.
_RECORDED_ONLY: dict[str, bool] = {"content": False}


@dataclass(frozen=True)
class ConvertOptions:
    """Everything that decides what a bundle contains (recorded in pissa.json).

    The fields' metadata says which of them decide the bundle's content (:meth:`content_record`: the
    resume fingerprint of ``converter.convert`` and the reuse check of ``pissa zoo``) and which are
    recorded in pissa.json (:meth:`to_record`).

    Attributes:
        rank: adapter rank r.
        alpha: lora_alpha as given (default: equal to rank, i.e. scaling 1); recorded, while the
            content key is the resulting ``lora_alpha``.
        rslora: rank-stabilised scaling alpha / √r.
        targets: module names (last path component, e.g. ``q_proj``, or full module paths) to
            convert; ``None`` means every linear layer except the output layer.
        svd: ``randomized`` (default) or ``exact``.
        niter: maximum Krylov steps of the randomized SVD (two passes over W each).
        oversample: extra columns per Krylov block of the randomized SVD (block size r + oversample).
        svd_tol: stop the Krylov steps once one raises the top-r energy of the space by less than
            this share of it (0: always run ``niter``).
        seed: seed of the randomized sketches (per matrix: derived from seed and the tensor name).
        dtype: residual dtype (``None``: the source's; for GGUF sources: bfloat16).
        adapter_dtype: dtype of lora_A / lora_B.
        workers: shards converted in parallel processes (1: in this process).
        threads: matrices factored in parallel threads per process (0: one per core / worker).
        device: ``cpu`` or ``cuda`` for the SVDs.
        quantize: ``nf4`` for a QPiSSA bundle (``None``: plain PiSSA): the adapter is fitted to the
            NF4-quantized residual ``Q`` (converter/qpissa.py). Without ``dtype`` the targets' residual is
            stored packed in bitsandbytes' 4-bit layout (transformers loads it with bitsandbytes); with
            ``dtype`` it is stored as ``deq(Q)`` in that dtype, an ordinary float model.
        quant_iters: QPiSSA refinements ``T`` (the best iterate is kept).
        quant_blocksize: NF4 block size.
        double_quant: quantize the NF4 absmax constants too.
        revision: hub revision (branch, tag or commit) for hub sources.
        allow_pickle: read ``.bin`` (pickle) checkpoints with ``torch.load(weights_only=True)``.
    """

    rank: int = 16
    alpha: float | None = field(default=None, metadata=_RECORDED_ONLY)
    rslora: bool = False
    targets: tuple[str, ...] | None = None
    svd: str = "randomized"
    niter: int = 10
    oversample: int = 0
    svd_tol: float = 1e-3
    seed: int = 0
    dtype: str | None = None
    adapter_dtype: str = "float32"
    workers: int = field(default=1, metadata=_RUN)
    threads: int = field(default=0, metadata=_RUN)
    device: str = field(default="cpu", metadata=_RUN)
    quantize: str | None = None
    quant_iters: int = 1
    quant_blocksize: int = 64
    double_quant: bool = False
    revision: str | None = None
    allow_pickle: bool = field(default=False, metadata=_RECORDED_ONLY)
    extra: dict[str, Any] = field(default_factory=dict, metadata=_RUN)

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def quant_options(self) -> QuantOptions | None:
        """The quantization of a QPiSSA conversion, ``None`` for a plain one."""
        if self.quantize is None:
            return None
        return QuantOptions(self.quantize, self.quant_blocksize, self.quant_iters, self.double_quant)

    def _quant_problems(self) -> list[str]:
        quant = self.quant_options()
        if quant is None:
            plain = QuantOptions()
            given = [
                flag
                for flag, value, default in [
                    ("--quant-iters", self.quant_iters, plain.iters),
                    ("--quant-blocksize", self.quant_blocksize, plain.blocksize),
                    ("--double-quant", self.double_quant, plain.double_quant),
                ]
                if value != default
            ]
            return [f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --quantize nf4"] if given else []
        p = quant.problems()
        return p

    def problems(self) -> list[str]:
        """Every problem with these options (empty when valid)."""
        p: list[str] = self._quant_problems()
        if self.rank < 1:
            p.append(f"--rank must be >= 1, got {self.rank}")
        if self.alpha is not None and not (0 < self.alpha < math.inf):  # NaN fails both comparisons
            p.append(f"--alpha must be a finite number > 0, got {self.alpha}")
        if self.svd not in SVD_METHODS:
            p.append(f"--svd must be one of {', '.join(SVD_METHODS)}, got {self.svd!r}")
        if self.niter < 0:
            p.append(f"--niter must be >= 0, got {self.niter}")
        if self.oversample < 0:
            p.append(f"--oversample must be >= 0, got {self.oversample}")
        if not 0 <= self.svd_tol < 1:
            p.append(f"--svd-tol must be in [0, 1), got {self.svd_tol}")
        if self.dtype is not None and self.dtype not in FLOAT_NAMES:
            p.append(f"--dtype must be one of {', '.join(FLOAT_NAMES)}, got {self.dtype!r}")
        if self.adapter_dtype not in FLOAT_NAMES:
            p.append(f"--adapter-dtype must be one of {', '.join(FLOAT_NAMES)}, got {self.adapter_dtype!r}")
        if self.workers < 1:
            p.append(f"--workers must be >= 1, got {self.workers}")
        if self.threads < 0:
            p.append(f"--threads must be >= 0, got {self.threads}")
        if self.device not in DEVICES:
            p.append(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.targets is not None and not [t for t in self.targets if t.strip()]:
            p.append("--targets is empty")
        return p

    def validate(self) -> ConvertOptions:
        """Return self, or raise :class:`InvalidOptionsError` listing every problem."""
        _raise_problems(self.problems(), "conversion")
        return self

    def _json(self, name: str) -> Any:
        value = getattr(self, name)
        return list(value) if isinstance(value, tuple) else value

    def to_record(self) -> dict[str, Any]:
        """JSON-ready form recorded in pissa.json: every recorded field, plus ``lora_alpha``."""
        record = {f.name: self._json(f.name) for f in fields(self) if f.metadata.get("recorded", True)}
        record["lora_alpha"] = self.lora_alpha
        return record

    def content_changes(self, recorded: Mapping[str, Any]) -> list[str]:
        """``"key was OLD, now NEW"`` for each content option (:meth:`content_record`) that differs from a
        bundle's recorded ``options``; an option the record lacks (an older bundle) is not compared. Pure."""
        return [f"{key} was {recorded[key]!r}, now {wanted!r}" for key, wanted in self.content_record().items()
                if key in recorded and recorded[key] != wanted]

    def content_record(self) -> dict[str, Any]:
        """The options that decide a bundle's bytes, JSON-ready, keyed as in :meth:`to_record`.

        Two conversions of the same source with equal content records write the same bundle; the
        other fields (workers, threads, device, allow_pickle, and ``alpha`` as given rather than the
        resulting ``lora_alpha``) change how the work is done, not its result.
        """
        record = {f.name: self._json(f.name) for f in fields(self) if f.metadata.get("content", True)}
        record["lora_alpha"] = self.lora_alpha
        return record
