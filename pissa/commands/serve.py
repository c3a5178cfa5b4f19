"""``pissa serve MANIFEST`` (or ``--base PATH --adapter NAME=PATH ...``): validate, start vLLM, serve."""

from __future__ import annotations

from pathlib import Path

import click

from pissa.commands.common import default_of
from serving.manifest import VllmSettings

_HOST = default_of(VllmSettings, "host")
_PORT = default_of(VllmSettings, "port")
_DTYPE = default_of(VllmSettings, "dtype")


@click.command("serve")
@click.argument("manifest", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--base", help="Base model folder or hub id (instead of a manifest).")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=PATH", help="Adapter to serve (repeatable).")
@click.option("--served-name", help="Name clients use for the base (default: --base as given).")
@click.option("--host", default=None, help=f"Bind address [manifest or {_HOST}].")
@click.option("--port", type=int, default=None, help=f"Port [manifest or {_PORT}].")
@click.option("--dtype", default=None, type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
              help=f"vLLM's dtype [manifest or {_DTYPE}].")
@click.option("--max-loras", type=int, default=None, help="LoRA slots per batch [number of adapters].")
@click.option("--kv-cache", "kv_cache", default=None,
              help="KV cache size, e.g. 64M or 1G [manifest; on CPU: chosen from free memory, at most 1G].")
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path), help="vLLM's log [a temp file].")
@click.option("--dry-run", is_flag=True, help="Validate and print the exact vLLM command; start nothing.")
def serve(manifest: Path | None, base: str | None, adapters: tuple[str, ...], served_name: str | None,
          host: str | None, port: int | None, dtype: str | None, max_loras: int | None, kv_cache: str | None,
          log_file: Path | None, dry_run: bool) -> None:
    """Serve one base and many LoRA adapters with vLLM's OpenAI-compatible server.

    Every adapter is checked against the base before anything starts (all problems at once).
    Ctrl-C or SIGTERM stops vLLM and every process it started.
    """
    from serving.launcher import serve as run_serve
    from serving.manifest import resolve_manifest

    m = resolve_manifest(manifest, base=base, adapters=list(adapters), served_name=served_name, host=host,
                         port=port, dtype=dtype, max_loras=max_loras, kv_cache=kv_cache)

    def on_ready(plan, startup: float, log_path: Path) -> None:
        what = "gateway endpoint (tenant keys)" if m.gateway is not None else "OpenAI endpoint"
        click.echo(f"vLLM is up after {startup:.1f} s — {what} {plan.url}/v1")
        click.echo(f"  base:     {plan.served_names[0]}")
        for name in plan.served_names[1:]:
            click.echo(f"  adapter:  {name}")
        click.echo(f"  max_lora_rank {plan.max_lora_rank}; log {log_path}; Ctrl-C to stop")
        for note in plan.notes:
            click.echo(f"  {note}")

    result = run_serve(m, dry_run=dry_run, log_path=log_file, on_ready=on_ready)
    if dry_run:
        for note in result.plan.notes:
            click.echo(note)
        click.echo(result.plan.shell())
    else:
        click.echo(f"stopped ({result.stopped_by}); vLLM and its processes have exited")
