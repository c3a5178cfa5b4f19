"""Options of a fine-tuning run: one frozen dataclass, validated with every problem reported at once."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from pissa.core.errors import InvalidOptionsError

INITS = ("pissa", "lora", "qlora")
OVERLONG = ("drop", "truncate")
SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class TrainOptions:
    """Everything that decides a training run (recorded in ``RUN/run.json``).

    Attributes:
        init: ``pissa`` (residual + the bundle's principal adapter, trainable) or ``lora`` (the same
            recipe as plain LoRA on the original base, same rank/alpha/targets, with PEFT's default
            init ``init_lora_weights=True``: A Kaiming-uniform (``a=√5``, as ``nn.Linear``), B zero), or
            ``qlora`` (the same fresh LoRA on ``NF4(W)`` of the original target weights, training/quant.py).
            A QPiSSA bundle packed in 4 bits trains ``pissa`` QLoRA-style (frozen 4-bit residual); ``lora``
            and ``qlora`` need an unquantized bundle (the original weights are rebuilt from it).
        epochs: passes over the data (ignored when ``max_steps`` is set).
        max_steps: optimizer steps (overrides ``epochs``).
        lr: peak learning rate.
        batch_size: examples per process per micro-batch (the effective batch is
            ``batch_size · grad_accum · processes``).
        grad_accum: micro-batches per optimizer step.
        max_length: longest tokenized example; longer ones are dropped or truncated (``overlong``).
        overlong: ``drop`` or ``truncate`` examples longer than ``max_length`` (counted either way).
        warmup: linear warm-up: steps if >= 1, a fraction of the run if in [0, 1).
        schedule: learning-rate schedule after warm-up.
        weight_decay: AdamW weight decay.
        eval_data: held-out data (same formats as the training data) for the eval loss.
        eval_every: evaluate every N steps (default: only at the end when ``eval_data`` is given).
        save_every: checkpoint every N steps (needed for ``--resume``; default: only at the end).
        log_every: write a metrics line every N steps.
        seed: seed of data order and (for ``lora``) of the adapter init.
        bf16: bf16 mixed precision (GPUs).
        gradient_checkpointing: recompute activations in the backward pass (saves memory on GPUs).
        dtype: dtype the residual model is loaded in (``float32``; ``bfloat16`` saves memory on GPUs).
    """

    init: str = "pissa"
    epochs: float = 1.0
    max_steps: int | None = None
    lr: float = 2e-5
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 512
    overlong: str = "drop"
    warmup: float = 0.0
    schedule: str = "linear"
    weight_decay: float = 0.0
    eval_data: str | None = None
    eval_every: int | None = None
    save_every: int | None = None
    log_every: int = 1
    seed: int = 0
    bf16: bool = False
    gradient_checkpointing: bool = False
    dtype: str = "float32"

    def problems(self) -> list[str]:
        """Every problem with these options (empty when valid)."""
        p: list[str] = []
        if self.init not in INITS:
            p.append(f"--init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.max_steps is None and not self.epochs > 0:
            p.append(f"--epochs must be > 0, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            p.append(f"--max-steps must be >= 1, got {self.max_steps}")
        if not self.lr > 0:
            p.append(f"--lr must be > 0, got {self.lr}")
        for name in ("batch_size", "grad_accum", "max_length", "log_every"):
            if getattr(self, name) < 1:
                p.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                p.append(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.eval_every is not None and self.eval_data is None:
            p.append("--eval-every needs --eval-data")
        if self.overlong not in OVERLONG:
            p.append(f"--overlong must be one of {', '.join(OVERLONG)}, got {self.overlong!r}")
        if self.warmup < 0 or (self.warmup >= 1 and self.warmup != int(self.warmup)):
            p.append(f"--warmup must be a whole number of steps or a fraction in [0, 1), got {self.warmup}")
        if self.schedule not in SCHEDULES:
            p.append(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.weight_decay < 0:
            p.append(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.dtype not in DTYPES:
            p.append(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        return p

    def validate(self) -> TrainOptions:
        """Return self, or raise :class:`InvalidOptionsError` listing every problem."""
        problems = self.problems()
        if problems:
            raise InvalidOptionsError("invalid training options", problems, fix="correct the options above")
        return self

    def with_overrides(self, **overrides: Any) -> TrainOptions:
        """A copy with ``overrides`` applied (unknown names are reported, not ignored)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise InvalidOptionsError(
                "invalid training options", [f"unknown option {name!r}" for name in unknown],
                fix=f"use one of: {', '.join(sorted(known))}",
            )
        return replace(self, **overrides)

    def to_record(self) -> dict[str, Any]:
        return asdict(self)
