"""``pissa convert SOURCE OUT``: parse options, call :func:`converter.convert.convert`, print a summary."""

from __future__ import annotations

import click

from converter.options import DEVICES, SVD_METHODS, ConvertOptions
from pissa.commands.common import default_of, human_bytes


def _default(name: str) -> object:
    return default_of(ConvertOptions, name)


@click.command("convert")
@click.argument("source")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--rank", "-r", type=int, default=_default("rank"), show_default=True, help="Adapter rank r.")
@click.option("--alpha", type=float, default=_default("alpha"), help="lora_alpha (default: equal to the rank).")
@click.option("--rslora", is_flag=True, help="Rank-stabilised scaling alpha/√r.")
@click.option("--targets", default=None, help="Comma-separated layer names (default: all linear but lm_head; MoE experts and routers are left out).")
@click.option("--svd", type=click.Choice(SVD_METHODS), default=_default("svd"), show_default=True)
@click.option("--niter", type=int, default=_default("niter"), show_default=True,
              help="Maximum Krylov steps (randomized SVD; 2 passes over W each).")
@click.option("--oversample", type=int, default=_default("oversample"), show_default=True,
              help="Extra sketch columns per Krylov block (randomized SVD).")
@click.option("--svd-tol", type=float, default=_default("svd_tol"), show_default=True,
              help="Stop the Krylov steps when one adds less than this share of the top-r energy (0: never).")
@click.option("--seed", type=int, default=_default("seed"), show_default=True, help="Seed of the randomized sketches.")
@click.option("--dtype", "--residual-dtype", "dtype", default=_default("dtype"),
              help="Residual dtype (default: the source's; GGUF: bfloat16).")
@click.option("--adapter-dtype", default=_default("adapter_dtype"), show_default=True,
              help="Dtype of lora_A / lora_B.")
@click.option("--quantize", default=_default("quantize"),
              help="nf4: QPiSSA, the adapter fitted to the NF4-quantized residual, stored packed in 4 bits "
              "(bitsandbytes' layout), or dequantized when --residual-dtype is given.")
@click.option("--quant-iters", type=int, default=_default("quant_iters"), show_default=True,
              help="QPiSSA refinements (re-quantize, re-fit the adapter); the best is kept.")
@click.option("--quant-blocksize", type=int, default=_default("quant_blocksize"), show_default=True,
              help="NF4 block size (64, 128, ..., 4096).")
@click.option("--double-quant", is_flag=True, help="Quantize the NF4 absmax constants too.")
@click.option("--workers", type=int, default=_default("workers"), show_default=True,
              help="Shards converted in parallel processes.")
@click.option("--threads", type=int, default=_default("threads"), show_default=True,
              help="Matrices factored in parallel per process (0: cores / workers).")
@click.option("--device", type=click.Choice(DEVICES), default=_default("device"), show_default=True)
@click.option("--revision", default=_default("revision"), help="Hub revision (branch, tag or commit) for hub sources.")
@click.option("--allow-pickle", is_flag=True, help="Read pytorch_model*.bin with torch.load(weights_only=True).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--resume", is_flag=True, help="Continue an interrupted conversion into OUT.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def convert(source: str, out: str, targets: str | None, overwrite: bool, resume: bool, quiet: bool, **kw) -> None:
    """Convert SOURCE (model folder, .gguf file, hub:ORG/NAME or hub:ORG/NAME/FILE.gguf) into a PiSSA bundle at OUT."""
    from converter.alloc import tune_allocator
    from converter.convert import convert as run_convert
    from converter.targets import describe_left_out

    tune_allocator()

    names = tuple(t for t in targets.split(",")) if targets else None
    options = ConvertOptions(targets=names, **kw)
    report = run_convert(source, out, options, overwrite=overwrite, resume=resume, progress=not quiet)
    rows = [
        ("bundle", str(report.out)),
        ("matrices", str(report.matrices)),
        *([("left out", describe_left_out(report.left_out))] if report.left_out else []),
        ("energy share (mean / worst)", f"{report.mean_energy:.4f} / {report.min_energy:.4f}"),
        ("max reconstruction error", f"{report.max_rel_error:.2e}"),
        *([("nuclear error below QLoRA", f"{100 * report.record['quantization']['below_qlora']:.1f}%")]
          if "quantization" in report.record else []),
        ("shards (reused)", f"{report.shards_total} ({max(report.shards_reused, 0)})"),
        ("time", f"{report.seconds:.1f} s"),
        ("size", human_bytes(report.output_bytes)),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")
