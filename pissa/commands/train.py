"""``pissa train BUNDLE --data FILE --out RUN``: thin CLI over :func:`training.train.train`."""

from __future__ import annotations

import click

from pissa.commands.common import default_of
from training.options import DTYPES, INITS, OVERLONG, SCHEDULES, TrainOptions


def _default(name: str) -> object:
    return default_of(TrainOptions, name)


@click.command(name="train")
@click.argument("bundle", type=click.Path(path_type=str))
@click.option("--data", required=True, type=click.Path(path_type=str),
              help="JSONL ({prompt,response} or {messages}) or a saved datasets folder.")
@click.option("--out", required=True, type=click.Path(path_type=str), help="Run folder.")
@click.option("--init", type=click.Choice(INITS), default=_default("init"), show_default=True,
              help="pissa: the bundle's principal adapter; lora: plain-LoRA baseline on the original base.")
@click.option("--epochs", type=float, default=_default("epochs"), show_default=True)
@click.option("--max-steps", type=int, default=_default("max_steps"), help="Optimizer steps (overrides --epochs).")
@click.option("--lr", type=float, default=_default("lr"), show_default=True)
@click.option("--batch-size", type=int, default=_default("batch_size"), show_default=True)
@click.option("--grad-accum", type=int, default=_default("grad_accum"), show_default=True)
@click.option("--max-length", type=int, default=_default("max_length"), show_default=True)
@click.option("--overlong", type=click.Choice(OVERLONG), default=_default("overlong"), show_default=True,
              help="What to do with examples longer than --max-length (counted either way).")
@click.option("--warmup", type=float, default=_default("warmup"), show_default=True,
              help="Warm-up steps (>= 1) or fraction of the run (< 1).")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=_default("schedule"), show_default=True)
@click.option("--weight-decay", type=float, default=_default("weight_decay"), show_default=True)
@click.option("--eval-data", type=click.Path(path_type=str), default=_default("eval_data"),
              help="Held-out data for eval loss.")
@click.option("--eval-every", type=int, default=_default("eval_every"),
              help="Evaluate every N steps (default: at the end).")
@click.option("--save-every", type=int, default=_default("save_every"),
              help="Checkpoint every N steps (for --resume).")
@click.option("--log-every", type=int, default=_default("log_every"), show_default=True)
@click.option("--seed", type=int, default=_default("seed"), show_default=True)
@click.option("--bf16", is_flag=True, help="bf16 mixed precision (GPU).")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations (saves GPU memory).")
@click.option("--dtype", type=click.Choice(DTYPES), default=_default("dtype"),
              show_default=True, help="dtype the residual model is loaded in.")
@click.option("--resume", is_flag=True, help="Continue RUN from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty RUN.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def train(bundle: str, data: str, out: str, resume: bool, overwrite: bool, no_progress: bool, **options) -> None:
    """Fine-tune a bundle's PiSSA adapter (or, with --init lora, the plain-LoRA baseline).

    Runs in one process as is. Data-parallel over N processes (DDP; gloo on CPU, nccl on GPUs):
    `torchrun --standalone --nproc_per_node N -m pissa train ...` or
    `accelerate launch --multi_gpu --num_processes N -m pissa train ...`; --batch-size is per process
    (see docs/training.md). On GPUs add --bf16 and optionally --gradient-checkpointing.
    """
    from training.train import train as run_train

    result = run_train(bundle, data, out, TrainOptions(**options), resume=resume,
                       overwrite=overwrite, progress=not no_progress)
    if not result.is_main:
        return  # rank 0 reports for the whole run
    d = result.data
    click.echo(f"trained {result.init} for {result.steps} steps in {result.seconds:.1f} s → {result.adapter}")
    if result.world_size > 1:
        click.echo(f"  {result.world_size} processes, effective batch {result.effective_batch_size}")
    click.echo(f"  data: {d.examples} examples of {d.records} records ({d.dropped_overlong} dropped as too long, "
               f"{d.truncated} truncated, {d.dropped_no_target} without response tokens)")
    if result.first_loss is not None and result.final_loss is not None:
        click.echo(f"  loss: {result.first_loss:.4f} → {result.final_loss:.4f}"
                   + (f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""))
    if result.tokens_per_second:
        click.echo(f"  throughput: {result.tokens_per_second:.0f} tokens/s")
    if result.plot is not None:
        click.echo(f"  curves: {result.out / 'metrics.jsonl'}, {result.plot}")
