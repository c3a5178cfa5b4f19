"""``pissa train``: fine-tune a bundle's PiSSA adapter (or a plain-LoRA baseline) with transformers' Trainer.

The recipe (one for both inits, so the comparison is fair):

- ``init="pissa"``: ``AutoModelForCausalLM.from_pretrained(BUNDLE)`` (the residual) +
  ``PeftModel.from_pretrained(model, BUNDLE, subfolder="pissa_init", is_trainable=True)``.
- ``init="lora"``: the original base, rebuilt from the bundle as ``W_res + s·B₀A₀`` (= the source
  weights up to the residual dtype's rounding; no access to the source needed), + a fresh PEFT LoRA
  adapter with the bundle's rank, alpha, rsLoRA flag and targets (Kaiming-uniform A, zero B).
- ``init="qlora"``: as ``lora``, with the target layers replaced by frozen NF4 ``Linear4bit`` layers
  quantized from the rebuilt float32 weights (training/quant.py): QLoRA's starting point.
- QPiSSA (``init="pissa"`` on a bundle converted with ``--quantize nf4`` and no ``--residual-dtype``):
  the bundle loads as a 4-bit model (frozen NF4 residual, bitsandbytes), the adapter trains in float32
  (the run's ``--dtype``). ``lora`` and ``qlora`` need an unquantized bundle of the same source.

Both then run the same Trainer: AdamW, the chosen schedule with warm-up, gradient clipping at 1.0,
loss on response tokens only. Distribution (DDP/FSDP/DeepSpeed), bf16 and gradient checkpointing are
the Trainer's own, configured by the launcher (``torchrun``, ``accelerate launch``) and the options;
nothing here is home-made.

Several processes (DDP): ``W`` ranks with ``--batch-size b`` train one run with the effective batch
``W·b·grad_accum``. The loss of a step is averaged over the response tokens of the whole global
batch (the Trainer's ``average_tokens_across_devices``: each rank's token-summed loss is divided by
the token count gathered from every rank), so it is the loss one process with batch ``W·b`` computes
on the same examples. On a machine without an accelerator the Trainer is told to use the CPU
(``use_cpu``): otherwise accelerate, launched under ``torchrun``, initializes a process group but
reports no distributed setup, and every rank trains alone. Only rank 0 writes the run folder
(``run.json``, metrics, plot, final adapter; the Trainer writes checkpoints from rank 0 too).

RUN layout::

    RUN/run.json                  options, data statistics, bundle, status and results
    RUN/metrics.jsonl             one line per logged step (see training.metrics)
    RUN/checkpoints/checkpoint-N  Trainer checkpoints (PEFT adapter + optimizer/scheduler/RNG state)
    RUN/adapter/                  the final adapter (+ pissa_training.json, used by ``pissa export``)
    RUN/loss.png                  loss curves
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pissa.core.errors import CorruptCheckpointError, InvalidOptionsError, OutputExistsError, PissaError
from pissa.core.formats import adapter as adapter_format
from pissa.core.formats import run as run_format
from pissa.core.formats.bundle import INIT_DIR, Bundle, open_bundle
from pissa.core.formats.run import write_training_record
from pissa.core.jsonio import read_json, write_json
from pissa.core.outputs import check_not_a_file, check_not_an_input, is_nonempty_dir
from training.data import Collator, DataStats, Example, encode_records, read_records
from training.metrics import append_metrics, read_metrics, truncate_metrics
from training.options import TrainOptions
from training.plot import plot_runs

logger = logging.getLogger(__name__)

CHECKPOINTS = run_format.CHECKPOINTS_DIR
ADAPTER = run_format.ADAPTER_DIR
PLOT = run_format.PLOT
# Options that may differ between the interrupted run and its --resume (they do not change the trajectory).
_RESUME_FREE = ("eval_every", "save_every", "log_every")


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` did.

    Attributes:
        out: the run folder.
        adapter: the final adapter folder (``out/adapter``).
        init: ``pissa`` or ``lora``.
        steps: optimizer steps done (in total, over resumes).
        first_loss: training loss of the first logged step.
        final_loss: training loss of the last logged step.
        eval_loss: last eval loss (``None`` without eval data).
        tokens_per_second: input tokens (without padding) per second of this process's training.
        seconds: wall time of this call.
        data: statistics of the training data.
        eval: statistics of the eval data.
        plot: the loss plot.
        world_size: processes that trained this run together (1 without a distributed launcher).
        effective_batch_size: examples per optimizer step over all processes
            (``world_size · batch_size · grad_accum``).
        is_main: this process is rank 0 (the one that wrote the run folder and reports the result).
    """

    out: Path
    adapter: Path
    init: str
    steps: int
    first_loss: float | None
    final_loss: float | None
    eval_loss: float | None
    tokens_per_second: float | None
    seconds: float
    data: DataStats
    eval: DataStats | None
    plot: Path | None
    world_size: int = 1
    effective_batch_size: int | None = None
    is_main: bool = True


def has_accelerator() -> bool:
    """Whether torch sees a GPU-like device (CUDA, ROCm, MPS, XPU, ...); without one, training runs on the CPU."""
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None:
        return bool(accelerator.is_available())
    mps = getattr(torch.backends, "mps", None)
    return torch.cuda.is_available() or bool(mps is not None and mps.is_available())


def load_tokenizer(bundle: Bundle) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundle.path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_original_model(bundle: Bundle, dtype: str = "float32") -> Any:
    """The original base rebuilt from the bundle: ``W = W_res + s·B₀A₀`` (merged pissa_init).

    Equal to the source weights up to the residual dtype's rounding; needs no access to the source
    (useful when the source was a GGUF file or a hub id that is not cached).
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(bundle.path, dtype=getattr(torch, dtype))
    return PeftModel.from_pretrained(model, bundle.path, subfolder=INIT_DIR).merge_and_unload()


def _device_map() -> dict[str, Any]:
    """Where bitsandbytes puts a 4-bit model: this process's accelerator, else the CPU."""
    if not has_accelerator():
        return {"": "cpu"}
    return {"": int(os.environ.get("LOCAL_RANK", "0"))}


def check_init(bundle: Bundle, init: str) -> None:
    """``lora`` / ``qlora`` rebuild the original weights from the bundle: a QPiSSA bundle cannot give them back.

    Raises:
        InvalidOptionsError: a quantized bundle with ``--init lora`` or ``--init qlora``.
    """
    if init in ("lora", "qlora") and bundle.quantization is not None:
        raise InvalidOptionsError(
            f"--init {init} needs the original weights, and {bundle.path} is a QPiSSA bundle",
            [f"its residual is deq(Q), so deq(Q) + s·B₀A₀ is not the original W; --init {init} rebuilds W from a "
             "bundle converted without --quantize"],
            fix=f"convert the same source without --quantize and train --init {init} on that bundle",
        )


def load_model(bundle: Bundle, options: TrainOptions) -> Any:
    """The trainable PEFT model of the recipe for ``options.init`` (see the module docstring)."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, set_seed

    check_init(bundle, options.init)
    dtype = getattr(torch, options.dtype)
    if options.init == "pissa":
        if bundle.packed:
            from training.quant import require_bitsandbytes, set_compute_dtype

            require_bitsandbytes()
            # quantization_config in config.json: a 4-bit model, its targets frozen Linear4bit layers.
            model = AutoModelForCausalLM.from_pretrained(bundle.path, dtype=dtype, device_map=_device_map())
            set_compute_dtype(model, dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(bundle.path, dtype=dtype)
        return PeftModel.from_pretrained(model, bundle.path, subfolder=INIT_DIR, is_trainable=True)
    # Plain LoRA on the original base: W = W_res + s·B₀A₀, then a fresh adapter with the same shape.
    # QLoRA: the same, on NF4(W) of the target layers.
    init_config = read_json(bundle.init_dir / adapter_format.CONFIG)
    merged = load_original_model(bundle, "float32" if options.init == "qlora" else options.dtype)
    if options.init == "qlora":
        from training.quant import quantize_targets

        quantize_targets(merged, init_config["target_modules"], dtype)
        if options.dtype != "float32":
            for p in merged.parameters():
                if p.dtype == torch.float32:
                    p.data = p.data.to(dtype)
    set_seed(options.seed)
    config = LoraConfig(
        r=int(init_config["r"]),
        lora_alpha=init_config["lora_alpha"],
        use_rslora=bool(init_config.get("use_rslora")),
        target_modules=init_config["target_modules"],
        fan_in_fan_out=bool(init_config.get("fan_in_fan_out")),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        init_lora_weights=True,
    )
    return get_peft_model(merged, config)


def _lone_accelerate_cpu_launch(env: Mapping[str, str]) -> bool:
    """Whether this process was started by ``accelerate launch --cpu --num_processes N`` (N > 1) without MPI.

    That launcher starts ONE process (several CPU processes need ``--mpirun_hostfile``), marked by
    ``ACCELERATE_USE_CPU`` and a ``MASTER_ADDR`` it sets only when more than one process was asked for;
    ``torchrun``, mpirun and ``accelerate launch --multi_gpu`` all set ``WORLD_SIZE`` or MPI variables.
    """
    asked_cpu = env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    launched = any(k in env for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"))
    return asked_cpu and "MASTER_ADDR" in env and not launched


def _training_arguments(out: Path, options: TrainOptions, has_eval: bool) -> Any:
    """The Trainer's arguments; building them sets up the distributed state (process group) when launched
    by ``torchrun`` / ``accelerate launch``.

    ``use_cpu`` on a machine without an accelerator: accelerate only recognizes multi-process CPU training
    (``MULTI_CPU``, gloo) when told to use the CPU; without it, under ``torchrun`` it still initializes a
    process group but reports no distributed setup, and the Trainer then trains each rank alone.
    """
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out / CHECKPOINTS),
        use_cpu=not has_accelerator(),
        # Each step's loss is the token average over the whole global batch (all ranks), as in one process.
        average_tokens_across_devices=True,
        num_train_epochs=options.epochs,
        max_steps=options.max_steps if options.max_steps is not None else -1,
        learning_rate=options.lr,
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=options.batch_size,
        gradient_accumulation_steps=options.grad_accum,
        warmup_steps=options.warmup if options.warmup < 1 else int(options.warmup),
        lr_scheduler_type=options.schedule,
        weight_decay=options.weight_decay,
        optim="adamw_torch",
        max_grad_norm=1.0,
        logging_strategy="steps",
        logging_steps=options.log_every,
        eval_strategy="steps" if has_eval and options.eval_every else "no",
        eval_steps=options.eval_every,
        save_strategy="steps" if options.save_every else "no",
        save_steps=options.save_every or 500,
        seed=options.seed,
        data_seed=options.seed,
        bf16=options.bf16,
        gradient_checkpointing=options.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if options.gradient_checkpointing else None,
        ddp_find_unused_parameters=False,
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        dataloader_pin_memory=False,
        report_to="none",
        disable_tqdm=True,
    )


def _callbacks(out: Path, bundle: Bundle, options: TrainOptions, progress: bool) -> list[Any]:
    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):
        """Appends one metrics.jsonl line per log (main process only), with tokens/s since the last log."""

        def __init__(self) -> None:
            self.last_time: float | None = None
            self.last_tokens = 0
            self.started = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = self.last_time = time.perf_counter()
            self.last_tokens = state.num_input_tokens_seen

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            line: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
            if "loss" in logs:
                now = time.perf_counter()
                tokens = state.num_input_tokens_seen
                dt = now - (self.last_time or now)
                line.update(
                    loss=float(logs["loss"]),
                    lr=float(logs.get("learning_rate", float("nan"))),
                    grad_norm=float(logs["grad_norm"]) if logs.get("grad_norm") is not None else None,
                    tokens_per_s=round((tokens - self.last_tokens) / dt, 1) if dt > 0 else None,
                    time_s=round(now - self.started, 3),
                )
                self.last_time, self.last_tokens = now, tokens
            elif "eval_loss" in logs:
                line["eval_loss"] = float(logs["eval_loss"])
            else:
                return
            append_metrics(out, line)

    class RecordCallback(TrainerCallback):
        """Leaves pissa_training.json in every checkpoint so checkpoints can be exported too."""

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if folder.is_dir():
                    write_training_record(folder, bundle=bundle, init=options.init, step=state.global_step)

    class ProgressBar(TrainerCallback):
        """tqdm bar over optimizer steps with the latest loss and the ETA."""

        def __init__(self) -> None:
            self.bar: Any = None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=f"train ({options.init})",
                                unit="step", dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is not None and logs:
                shown = {k: f"{logs[k]:.4g}" for k in ("loss", "eval_loss") if k in logs}
                if shown:
                    self.bar.set_postfix(shown)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    callbacks: list[Any] = [MetricsCallback(), RecordCallback()]
    if progress:
        callbacks.append(ProgressBar())
    return callbacks


def _last_checkpoint(out: Path) -> Path | None:
    folder = out / CHECKPOINTS
    if not folder.is_dir():
        return None
    found = [(int(p.name.split("-")[-1]), p) for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return max(found)[1] if found else None


def _check_resume(out: Path, bundle: Bundle, data: Path, options: TrainOptions,
                  world: int) -> tuple[Path, dict[str, Any]]:
    """The checkpoint to resume from, after checking the run was started with the same settings, and the
    cadence options (:data:`_RESUME_FREE`) not given now that the run was started with (it keeps them)."""
    record_path = out / run_format.RECORD
    if not record_path.is_file():
        raise InvalidOptionsError("cannot resume", [f"{out} is not a run folder (no {run_format.RECORD})"],
                                  fix="start the run without --resume")
    record = read_json(record_path)
    problems = []
    if record.get("bundle") != str(bundle.path):
        problems.append(f"the run was started from bundle {record.get('bundle')}, not {bundle.path}")
    if record.get("data", {}).get("path") != str(data.resolve()):
        problems.append(f"the run was started on data {record.get('data', {}).get('path')}, not {data.resolve()}")
    before = record.get("options", {})
    for key, value in options.to_record().items():
        if key not in _RESUME_FREE and before.get(key) != value:
            problems.append(f"option {key} was {before.get(key)!r}, now {value!r}")
    started_world = int(record.get("world_size", 1))
    if started_world != world:
        problems.append(f"the run was trained by {started_world} processes, now {world} (the effective batch "
                        "would change)")
    checkpoint = _last_checkpoint(out)
    if checkpoint is None:
        problems.append(f"{out / CHECKPOINTS} holds no checkpoint (train with --save-every N to make some)")
    if problems:
        raise InvalidOptionsError(f"cannot resume {out}", problems, fix="resume with the run's original settings")
    assert checkpoint is not None
    if options.max_steps and int(checkpoint.name.split("-")[-1]) >= options.max_steps:
        # Trainer would run one more step (at learning rate 0) and call the run longer than it is.
        done = record.get("status") == "finished" and (out / ADAPTER).is_dir()
        raise InvalidOptionsError("nothing to resume", [f"{out} has trained all {options.max_steps} steps"],
                                  fix=f"export it: `pissa export {out}`" if done else
                                  f"its last checkpoint holds the trained adapter: `pissa export {checkpoint}`")
    kept = {k: before[k] for k in _RESUME_FREE if getattr(options, k) is None and before.get(k) is not None}
    return checkpoint, kept


def _encode(tokenizer: Any, path: Path, options: TrainOptions) -> tuple[list[Example], DataStats]:
    records = read_records(path)
    return encode_records(tokenizer, records, max_length=options.max_length, overlong=options.overlong,
                          path=str(path))


def train(
    bundle: str | os.PathLike[str],
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    options: TrainOptions | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    callbacks: Sequence[Any] = (),
    **overrides: Any,
) -> TrainResult:
    """Fine-tune ``bundle`` on ``data`` into the run folder ``out``.

    Args:
        bundle: a bundle written by ``pissa convert``.
        data: JSONL file (``prompt``/``response`` or ``messages``) or a saved datasets folder.
        out: the run folder (layout in the module docstring).
        options: the recipe (:class:`TrainOptions`); ``overrides`` replace single fields, e.g.
            ``train(b, d, o, max_steps=30, lr=1e-4)``.
        resume: continue ``out`` from its last checkpoint (same trajectory as an uninterrupted run).
        overwrite: delete a non-empty ``out`` first.
        progress: show a progress bar.
        callbacks: extra ``transformers.TrainerCallback`` objects.

    Returns:
        A :class:`TrainResult`.

    Raises:
        InvalidOptionsError, TrainingDataError, SourceNotFoundError, OutputExistsError.
    """
    started = time.perf_counter()
    options = (options or TrainOptions()).with_overrides(**overrides).validate()
    out_path = Path(out).absolute()
    data_path = Path(data)
    b = open_bundle(bundle)
    check_init(b, options.init)  # before the run folder is touched
    # Under torchrun / accelerate launch this sets up the process group (every rank gets here).
    args = _training_arguments(out_path, options, options.eval_data is not None)
    world = int(args.world_size)
    if world == 1 and _lone_accelerate_cpu_launch(os.environ):
        raise InvalidOptionsError(
            "accelerate launch --cpu started one process",
            ["accelerate launch --cpu with --num_processes > 1 starts a single process unless given an MPI "
             "--mpirun_hostfile: this process would train alone"],
            fix="launch with `accelerate launch --multi_gpu --num_processes N -m pissa train ...` (gloo on CPU) "
                "or `torchrun --standalone --nproc_per_node N -m pissa train ...`",
        )
    # Every rank checks the run folder before any rank writes to it (the barrier below), so all ranks
    # see the same folder and fail alike; only rank 0 then deletes or writes anything.
    checkpoint: Path | None = None
    if resume:
        checkpoint, kept = _check_resume(out_path, b, data_path, options, world)
        if kept:  # a resumed run keeps its checkpoint and eval cadence unless a new one is given
            options = options.with_overrides(**kept).validate()
            args = _training_arguments(out_path, options, options.eval_data is not None)
    else:
        check_not_an_input(out_path, [bundle, data, options.eval_data])  # --overwrite would delete it
        check_not_a_file(out_path)
        if is_nonempty_dir(out_path) and not overwrite:
            raise OutputExistsError(str(out_path))

    tokenizer = load_tokenizer(b)
    train_examples, train_stats = _encode(tokenizer, data_path, options)
    eval_examples, eval_stats = (None, None)
    if options.eval_data:
        eval_examples, eval_stats = _encode(tokenizer, Path(options.eval_data), options)

    # The model before the run folder: a bundle that does not load leaves nothing half-written behind.
    model = _load_checked(b, options)
    main = args.process_index == 0
    args.distributed_state.wait_for_everyone()
    if main:
        if not resume and out_path.exists() and any(out_path.iterdir()):
            shutil.rmtree(out_path)  # --overwrite (checked above)
        out_path.mkdir(parents=True, exist_ok=True)
        if checkpoint is not None:
            step = int(checkpoint.name.split("-")[-1])
            truncate_metrics(out_path, step)
            logger.info("resuming %s from %s", out_path, checkpoint.name)
        write_json(out_path / run_format.RECORD,
                   _run_record(b, data_path, options, train_stats, eval_stats, "running", world))
    if world > 1:
        logger.info("rank %d of %d: effective batch %d (%d per process x %d accumulation steps x %d processes)",
                    args.process_index, world, _effective_batch(options, world), options.batch_size,
                    options.grad_accum, world)

    from transformers import PrinterCallback, Trainer

    if options.gradient_checkpointing:
        model.enable_input_require_grads()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_examples,
        eval_dataset=eval_examples,
        data_collator=Collator(tokenizer.pad_token_id),
        callbacks=[*_callbacks(out_path, b, options, progress and main), *callbacks],
    )
    trainer.remove_callback(PrinterCallback)
    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    evaluated = [h.get("step") for h in trainer.state.log_history if "eval_loss" in h]
    if eval_examples is not None and (not evaluated or evaluated[-1] != trainer.state.global_step):
        trainer.evaluate()  # the final eval loss, unless the last step just logged one

    adapter = out_path / ADAPTER
    plot: Path | None = None
    if trainer.is_world_process_zero():
        _save_adapter(trainer.model, adapter, b, options, trainer.state.global_step)
        plot = plot_runs([out_path], out_path / PLOT, title=f"{out_path.name}: {options.init}")
    lines = read_metrics(out_path) if main else []
    losses = [m["loss"] for m in lines if "loss" in m]
    evals = [m["eval_loss"] for m in lines if "eval_loss" in m]
    runtime = output.metrics.get("train_runtime") or 0.0
    tokens_seen = trainer.state.num_input_tokens_seen
    speed = output.metrics.get("train_tokens_per_second")
    if speed is None and runtime > 0 and not checkpoint:
        speed = tokens_seen / runtime
    result = TrainResult(
        out=out_path,
        adapter=adapter,
        init=options.init,
        steps=trainer.state.global_step,
        first_loss=losses[0] if losses else None,
        final_loss=losses[-1] if losses else None,
        eval_loss=evals[-1] if evals else None,
        tokens_per_second=_mean_speed(lines) if speed is None else float(speed),
        seconds=time.perf_counter() - started,
        data=train_stats,
        eval=eval_stats,
        plot=plot,
        world_size=world,
        effective_batch_size=_effective_batch(options, world),
        is_main=main,
    )
    if main:
        record = _run_record(b, data_path, options, train_stats, eval_stats, "finished", world)
        record["result"] = {
            "steps": result.steps, "first_loss": result.first_loss, "final_loss": result.final_loss,
            "eval_loss": result.eval_loss, "tokens_per_second": result.tokens_per_second,
            "seconds": round(result.seconds, 3),
        }
        write_json(out_path / run_format.RECORD, record)
    return result


def _load_checked(bundle: Bundle, options: TrainOptions) -> Any:
    """:func:`load_model`, with a bundle that does not load (truncated weights, no config.json) as one line."""
    try:
        return load_model(bundle, options)
    except PissaError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever transformers, safetensors or PEFT raise for a broken bundle
        if isinstance(exc, (MemoryError, ImportError)) or "OutOfMemory" in type(exc).__name__:
            raise  # not the bundle's fault
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CorruptCheckpointError(f"cannot load the bundle {bundle.path}: {type(exc).__name__}: {first}",
                                     path=str(bundle.path),
                                     fix=f"check it with `pissa verify {bundle.path}`, or convert it again") from exc


def _effective_batch(options: TrainOptions, world: int) -> int:
    return options.batch_size * options.grad_accum * world


def _mean_speed(lines: list[dict[str, Any]]) -> float | None:
    speeds = [m["tokens_per_s"] for m in lines if m.get("tokens_per_s")]
    return sum(speeds) / len(speeds) if speeds else None


def _save_adapter(model: Any, adapter: Path, bundle: Bundle, options: TrainOptions, step: int) -> None:
    """Save the final adapter atomically (temp folder, then rename) with its training record."""
    tmp = adapter.with_name(f".{adapter.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    if options.init in ("lora", "qlora"):
        # The baseline is an adapter for the original base (QLoRA: its NF4 quantization): say so in its config.
        config = read_json(tmp / adapter_format.CONFIG)
        config["base_model_name_or_path"] = bundle.base_model
        write_json(tmp / adapter_format.CONFIG, config)
    write_training_record(tmp, bundle=bundle, init=options.init, step=step)
    if adapter.exists():
        shutil.rmtree(adapter)
    tmp.rename(adapter)


def _run_record(bundle: Bundle, data: Path, options: TrainOptions, stats: DataStats, eval_stats: DataStats | None,
                status: str, world: int) -> dict[str, Any]:
    from dataclasses import asdict

    return {
        "format": "pissa-run",
        "status": status,
        "bundle": str(bundle.path),
        "base_model": bundle.base_model,
        "options": options.to_record(),
        # Processes that trained together and the examples per optimizer step over all of them.
        "world_size": world,
        "effective_batch_size": _effective_batch(options, world),
        "data": {**asdict(stats), "path": str(data.resolve())},
        "eval_data": asdict(eval_stats) if eval_stats else None,
    }

