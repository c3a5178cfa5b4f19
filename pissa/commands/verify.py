"""``pissa verify BUNDLE [--source SOURCE]``."""

from __future__ import annotations

import click


@click.command("verify")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--source", default=None, help="Also check W ≈ W_res + s·BA against this source checkpoint.")
def verify(bundle: str, source: str | None) -> None:
    """Re-check a bundle's checksums, its adapter against pissa.json, and (with --source) the maths."""
    from converter.verify import verify_bundle

    report = verify_bundle(bundle, source=source)
    line = f"ok: {report.bundle}: {report.files} files, {report.matrices} matrices verified"
    if report.max_rel_error is not None:
        line += f"; max ‖W − (W_res + s·BA)‖/‖W‖ = {report.max_rel_error:.2e}"
    click.echo(line)
