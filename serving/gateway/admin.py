"""What ``pissa tenants`` does: keys (add, revoke, list) and usage, from a serving manifest's tenants."""

from __future__ import annotations

import datetime
import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pissa.core.errors import InvalidOptionsError
from serving.gateway import keys, store
from serving.gateway.config import GatewayConfig, Tenant
from serving.manifest import load_serve_manifest


@dataclass(frozen=True)
class TenantListing:
    tenant: Tenant
    keys: tuple[keys.KeyRecord, ...]
    runtime_models: tuple[str, ...]


def gateway_of(manifest: str | Path) -> GatewayConfig:
    """The manifest's gateway (its tenants, keys file and usage database).

    Raises:
        ManifestError: the manifest does not validate.
        InvalidOptionsError: it has no ``tenants:`` section.
    """
    gw = load_serve_manifest(manifest).gateway
    if gw is None:
        raise InvalidOptionsError(f"{manifest} has no tenants: section", [],
                                  fix="add tenants: (see manifests/serve-tenants.yaml)")
    return gw


def _tenant(gw: GatewayConfig, name: str) -> Tenant:
    tenant = gw.tenant(name)
    if tenant is None:
        names = [t.name for t in gw.tenants]
        near = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise InvalidOptionsError(f"no tenant {name!r} in the manifest", [],
                                  fix=f"{hint}tenants: {', '.join(names)}")
    return tenant


def add_key(manifest: str | Path, tenant: str,
            deliver: Callable[[str, keys.KeyRecord], None] | None = None) -> tuple[str, keys.KeyRecord]:
    """A new key for ``tenant``: ``(key, record)``; only the record is stored (a running gateway sees it
    within a second). ``deliver(key, record)`` shows it; if that raises ``OSError`` the key is removed
    again (:func:`serving.gateway.keys.add_key`)."""
    gw = gateway_of(manifest)
    _tenant(gw, tenant)
    return keys.add_key(gw.keys_file, tenant, deliver)


def revoke_key(manifest: str | Path, key_id: str) -> keys.KeyRecord:
    """Remove a key by id (a running gateway refuses it within a second)."""
    return keys.revoke_key(gateway_of(manifest).keys_file, key_id)


def list_tenants(manifest: str | Path) -> list[TenantListing]:
    """Every tenant with its key records (never keys) and the models granted to it at run time."""
    gw = gateway_of(manifest)
    records = keys.read_keys(gw.keys_file)
    grants = store.grants(gw.usage_db)
    return [TenantListing(t, tuple(r for r in records if r.tenant == t.name), tuple(sorted(grants.get(t.name, ()))))
            for t in gw.tenants]


def usage(manifest: str | Path, *, since: str | None = None, tenant: str | None = None) -> list[store.UsageRow]:
    """Usage per day, tenant and model from the manifest's ``usage_db``.

    Raises:
        InvalidOptionsError: ``since`` is not a date (YYYY-MM-DD) or ``tenant`` is unknown.
    """
    if since is not None:
        try:
            since = datetime.date.fromisoformat(since).isoformat()
        except ValueError:
            raise InvalidOptionsError(f"--since {since!r} is not a date", [], fix="write it as YYYY-MM-DD") from None
    gw = gateway_of(manifest)
    if tenant is not None:
        _tenant(gw, tenant)
    return store.usage_rows(gw.usage_db, since=since, tenant=tenant)
