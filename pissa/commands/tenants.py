"""``pissa tenants add-key|revoke|list|usage MANIFEST``: tenant keys and usage of a gateway manifest."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

_manifest = click.argument("manifest", type=click.Path(dir_okay=False, exists=True, path_type=Path))


@click.group("tenants")
def tenants() -> None:
    """Keys and usage of the tenants of a serving manifest (a running gateway sees key changes within 1 s)."""


@tenants.command("add-key")
@_manifest
@click.argument("tenant")
def add_key(manifest: Path, tenant: str) -> None:
    """Create a key for TENANT; print it once, alone, on stdout (KEY=$(pissa tenants add-key ...))."""
    from serving.gateway.admin import add_key as add

    def show(key: str, record: Any) -> None:  # a key that cannot be shown is removed again (OSError)
        click.echo(key)
        sys.stdout.flush()

    _, record = add(manifest, tenant, show)
    click.echo(f"key {record.id} for tenant {tenant} (shown once; only its hash is kept)", err=True)


@tenants.command("revoke")
@_manifest
@click.argument("key_id")
def revoke(manifest: Path, key_id: str) -> None:
    """Revoke the key KEY_ID (see `pissa tenants list`)."""
    from serving.gateway.admin import revoke_key

    record = revoke_key(manifest, key_id)
    click.echo(f"revoked key {record.id} of tenant {record.tenant}")


@tenants.command("list")
@_manifest
def list_(manifest: Path) -> None:
    """Tenants, their models, limits and key ids with creation dates (never keys)."""
    from serving.gateway.admin import list_tenants

    for item in list_tenants(manifest):
        t = item.tenant
        limits = ", ".join(f"{k}={v}" for k, v in t.limits.model_dump().items() if v is not None) or "no limits"
        models = ", ".join([*t.models, *(f"{m} (runtime)" for m in item.runtime_models)]) or "-"
        click.echo(f"{t.name}: models {models}; {limits}")
        for r in item.keys:
            click.echo(f"  key {r.id}  created {r.created}")
        if not item.keys:
            click.echo("  no keys: `pissa tenants add-key MANIFEST " + t.name + "`")


@tenants.command("usage")
@_manifest
@click.option("--since", help="First day to show (YYYY-MM-DD, UTC).")
@click.option("--tenant", help="Only this tenant.")
def usage(manifest: Path, since: str | None, tenant: str | None) -> None:
    """Requests and tokens per day, tenant and model."""
    from serving.gateway.admin import usage as read_usage

    rows = read_usage(manifest, since=since, tenant=tenant)
    header = ("day", "tenant", "model", "requests", "prompt", "completion", "total")
    table = [header] + [(r.day, r.tenant, r.model, str(r.requests), str(r.prompt_tokens),
                         str(r.completion_tokens), str(r.total_tokens)) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    if not rows:
        click.echo("no usage recorded yet", err=True)
