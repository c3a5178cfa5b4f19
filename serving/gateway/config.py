"""The serving manifest's ``gateway:`` and ``tenants:`` sections, and their resolved form.

Layout::

    gateway:
      host: 0.0.0.0                  # the public listener (vLLM then listens on loopback only)
      port: 8000
      keys_file: tenants.keys        # key ids and hashes (relative to the manifest), mode 0600
      usage_db: usage.sqlite         # usage per tenant and day, and runtime grants (SQLite)
      access_log: access.jsonl       # one JSON line per request; default: the log (stderr)
      max_body_bytes: 1M             # larger request bodies get 413
    tenants:
      - name: acme
        models: [tenant-a, smollm2]  # served names this tenant may call (adapters and/or the base)
        limits: {requests_per_minute: 120, max_concurrent: 8, max_tokens: 1024, tokens_per_day: 2000000}

Every limit is optional (absent: no limit). The cross-checks (allow-lists name served models, tenant
names are unique) live with the rest of the manifest's cross-checks in :mod:`serving.manifest`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field

from pissa.core.manifests import Host, ManifestModel, Seq, Size, check_name

Count = Annotated[int, Field(ge=1)]
Port = Annotated[int, Field(ge=1, le=65535)]


class Limits(ManifestModel):
    """A tenant's limits; each is off when absent."""

    requests_per_minute: Count | None = None
    max_concurrent: Count | None = None
    max_tokens: Count | None = None
    tokens_per_day: Count | None = None


class TenantSection(ManifestModel):
    name: Annotated[str, AfterValidator(check_name)]
    models: Seq[str] = ()
    limits: Limits = Limits()


class GatewaySection(ManifestModel):
    host: Host = "127.0.0.1"
    port: Port = 8000
    keys_file: str = "tenants.keys"
    usage_db: str = "usage.sqlite"
    access_log: str | None = None
    max_body_bytes: Size = 2**20


@dataclass(frozen=True)
class Tenant:
    name: str
    models: tuple[str, ...]
    limits: Limits


@dataclass(frozen=True)
class GatewayConfig:
    """The gateway as resolved from a manifest (paths absolute)."""

    host: str
    port: int
    keys_file: Path
    usage_db: Path
    tenants: tuple[Tenant, ...]
    access_log: Path | None = None
    max_body_bytes: int = 2**20
    served: tuple[str, ...] = ()  # the names the manifest serves (base and adapters): not reusable at run time

    def tenant(self, name: str) -> Tenant | None:
        return next((t for t in self.tenants if t.name == name), None)


def resolve_gateway(section: GatewaySection, tenants: tuple[TenantSection, ...], root: Path,
                    served: tuple[str, ...] = ()) -> GatewayConfig:
    """Resolve ``section``'s paths against the manifest's folder ``root``."""
    return GatewayConfig(
        host=section.host, port=section.port, keys_file=gateway_path(section.keys_file, root),
        usage_db=gateway_path(section.usage_db, root),
        tenants=tuple(Tenant(t.name, tuple(t.models), t.limits) for t in tenants),
        access_log=gateway_path(section.access_log, root) if section.access_log else None,
        max_body_bytes=section.max_body_bytes, served=served,
    )


def gateway_path(value: str, root: Path) -> Path:
    """A gateway file of the manifest: absolute as given, or relative to the manifest's folder ``root``."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else (root / path).resolve()
