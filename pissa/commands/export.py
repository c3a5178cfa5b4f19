"""``pissa export RUN|ADAPTER --out DIR``: thin CLI over :func:`converter.export.export`."""

from __future__ import annotations

import click

from converter.options import EXPORT_TOL


@click.command(name="export")
@click.argument("source", type=click.Path(path_type=str))
@click.option("--out", "out", required=True, type=click.Path(path_type=str), help="Output folder.")
@click.option("--rank", default=None, help="Compress to rank K (truncated SVD of ΔW), or 'auto'. Default: exact (2r).")
@click.option("--tol", default=EXPORT_TOL, show_default=True, type=float,
              help="--rank auto: largest worst-layer relative error of ΔW accepted.")
@click.option("--merge", is_flag=True, help="Write a full merged model (W + ΔW) instead of an adapter.")
@click.option("--bundle", default=None, type=click.Path(path_type=str),
              help="The bundle the adapter was trained from (default: recorded by `pissa train`).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
def export(source: str, out: str, rank: str | None, tol: float, merge: bool, bundle: str | None,
           overwrite: bool) -> None:
    """Export a trained PiSSA adapter (RUN folder, checkpoint or adapter) for the ORIGINAL base model."""
    from converter.export import export as run_export

    report = run_export(source, out, rank=rank, tol=tol, merge=merge, bundle=bundle, overwrite=overwrite)
    if report.mode == "merged":
        click.echo(f"merged model written to {report.out} (base layout, {len(report.layers)} matrices updated)")
        return
    click.echo(f"exported {report.mode} LoRA adapter to {report.out}: rank {report.rank}, "
               f"lora_alpha {report.lora_alpha:g}, base_model {report.base_model}")
    if report.candidates:
        tried = ", ".join(f"{k}:{v:.3g}" for k, v in report.candidates.items())
        click.echo(f"  --rank auto, worst-layer error per rank: {tried}")
    worst = max(report.layers, key=lambda e: e.rel_error, default=None)
    if worst is not None and report.mode == "compressed":
        click.echo(f"  worst-layer relative error of ΔW: {worst.rel_error:.3g} ({worst.name})")
    gaps = [e for e in report.layers if e.quant_gap is not None]
    if gaps:
        top = max(gaps, key=lambda e: e.quant_gap or 0.0)
        mean = sum(e.quant_gap or 0.0 for e in gaps) / len(gaps)
        click.echo(f"  QPiSSA: not carried by a LoRA on the original W, ‖deq(Q) + s·B₀A₀ − W‖/‖ΔW‖: "
                   f"mean {mean:.3g}, worst {top.quant_gap:.3g} ({top.name})")
    click.echo(f"  serve with vLLM: --enable-lora --max-lora-rank {report.max_lora_rank}")
