"""``pissa convert SOURCE OUT``: parse options, call :func:`converter.convert.convert`, print a summary."""

from __future__ import annotations

import click

from pissa.commands.common import human_bytes


@click.command("convert")
@click.argument("source")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--rank", "-r", default=16, show_default=True, help="Adapter rank r.")
@click.option("--alpha", type=float, default=None, help="lora_alpha (default: equal to the rank).")
@click.option("--rslora", is_flag=True, help="Rank-stabilised scaling alpha/√r.")
@click.option("--targets", default=None, help="Comma-separated layer names (default: all linear but lm_head).")
@click.option("--svd", type=click.Choice(["randomized", "exact"]), default="randomized", show_default=True)
@click.option("--niter", default=10, show_default=True, help="Maximum Krylov steps (randomized SVD; 2 passes over W each).")
@click.option("--oversample", default=0, show_default=True, help="Extra sketch columns per Krylov block (randomized SVD).")
@click.option("--svd-tol", default=1e-3, show_default=True,
              help="Stop the Krylov steps when one adds less than this share of the top-r energy (0: never).")
@click.option("--seed", default=0, show_default=True, help="Seed of the randomized sketches.")
@click.option("--dtype", default=None, help="Residual dtype (default: the source's; GGUF: bfloat16).")
@click.option("--adapter-dtype", default="float32", show_default=True, help="Dtype of lora_A / lora_B.")
@click.option("--workers", default=1, show_default=True, help="Shards converted in parallel processes.")
@click.option("--threads", default=0, help="Matrices factored in parallel per process (0: cores / workers).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) for hub sources.")
@click.option("--allow-pickle", is_flag=True, help="Read pytorch_model*.bin with torch.load(weights_only=True).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--resume", is_flag=True, help="Continue an interrupted conversion into OUT.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def convert(source: str, out: str, targets: str | None, overwrite: bool, resume: bool, quiet: bool, **kw) -> None:
    """Convert SOURCE (model folder, .gguf file, hub:ORG/NAME or hub:ORG/NAME/FILE.gguf) into a PiSSA bundle at OUT."""
    from converter.alloc import tune_allocator
    from converter.convert import convert as run_convert
    from converter.options import ConvertOptions

    tune_allocator()

    names = tuple(t for t in targets.split(",")) if targets else None
    options = ConvertOptions(targets=names, **kw)
    report = run_convert(source, out, options, overwrite=overwrite, resume=resume, progress=not quiet)
    rows = [
        ("bundle", str(report.out)),
        ("matrices", str(report.matrices)),
        ("energy share (mean / worst)", f"{report.mean_energy:.4f} / {report.min_energy:.4f}"),
        ("max reconstruction error", f"{report.max_rel_error:.2e}"),
        ("shards (reused)", f"{report.shards_total} ({max(report.shards_reused, 0)})"),
        ("time", f"{report.seconds:.1f} s"),
        ("size", human_bytes(report.output_bytes)),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")
