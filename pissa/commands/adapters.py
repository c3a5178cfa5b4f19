"""``pissa adapters add|remove|list``: manage adapters on a running ``pissa serve`` (vLLM) server."""

from __future__ import annotations

import os
from pathlib import Path

import click

from pissa.commands.common import default_of
from serving.manifest import VllmSettings

_URL = f"http://{default_of(VllmSettings, 'host')}:{default_of(VllmSettings, 'port')}"
_url = click.option("--url", default=_URL, show_default=True, help="Server address (pissa serve's default).")
_key = click.option("--api-key-env", default=None, help="Environment variable holding the API key.")


def _api_key(env_name: str | None) -> str | None:
    if not env_name:
        return None
    if not os.environ.get(env_name):
        from pissa.core.errors import InvalidOptionsError

        raise InvalidOptionsError(f"--api-key-env names {env_name!r}, which is not set", [],
                                  fix=f"export {env_name}=<key>, or drop --api-key-env for a server without a key")
    return os.environ[env_name]


@click.group("adapters")
def adapters() -> None:
    """Add, remove or list LoRA adapters on a running server (validated before loading)."""


@adapters.command("add")
@click.argument("name")
@click.argument("path", type=click.Path(path_type=Path))
@_url
@_key
@click.option("--base-alias", "aliases", multiple=True,
              help="Another name of the served base (as the manifest's base.aliases; repeatable).")
@click.option("--tenant", "tenants", multiple=True,
              help="Grant the adapter to this tenant at once (gateway with the admin key; repeatable).")
def add(name: str, path: Path, url: str, api_key_env: str | None, aliases: tuple[str, ...],
        tenants: tuple[str, ...]) -> None:
    """Validate the adapter at PATH against the served base, then load it as NAME."""
    from serving.client import add_adapter

    report = add_adapter(url, name, path, api_key=_api_key(api_key_env), aliases=aliases, tenants=tenants,
                         on_replica=lambda a: click.echo(f"  replica {a}"))
    rank = report.ranks.get(name) if report else None
    granted = f"; granted to {', '.join(tenants)}" if tenants else ""
    click.echo(f"added {name} (rank {rank}) from {path.resolve()}{granted}")


@adapters.command("remove")
@click.argument("name")
@_url
@_key
def remove(name: str, url: str, api_key_env: str | None) -> None:
    """Unload adapter NAME."""
    from serving.client import remove_adapter

    remove_adapter(url, name, api_key=_api_key(api_key_env), on_replica=lambda a: click.echo(f"  replica {a}"))
    click.echo(f"removed {name}")


@adapters.command("list")
@_url
@_key
def list_(url: str, api_key_env: str | None) -> None:
    """List the base and the adapters served at --url."""
    from serving.client import list_models

    for m in list_models(url, api_key=_api_key(api_key_env)):
        click.echo(f"{'adapter' if m.is_adapter else 'base':8} {m.name}  {m.root}")

