"""Helpers for the gateway tests: a gateway in a thread in front of :class:`tests.fake_vllm.FakeVllm`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from serving.gateway import keys
from serving.gateway.app import Gateway
from serving.gateway.config import GatewayConfig, Limits, Tenant
from serving.gateway.server import GatewayServer, bind
from tests.fake_vllm import FakeVllm, ThreadServer

ADMIN_KEY = "admin-secret"


@dataclass
class Running:
    url: str
    gateway: Gateway
    config: GatewayConfig
    fake: FakeVllm
    keys: dict[str, str]  # tenant -> a key


def config(tmp: Path, **limits: Limits) -> GatewayConfig:
    """Tenants acme (a1, base), beta (b1), gamma (a2) and delta (a1); ``limits`` by tenant name."""
    tenants = (Tenant("acme", ("a1", "base"), limits.get("acme", Limits())),
               Tenant("beta", ("b1",), limits.get("beta", Limits())),
               Tenant("gamma", ("a2",), limits.get("gamma", Limits())),
               Tenant("delta", ("a1",), limits.get("delta", Limits())))
    return GatewayConfig("127.0.0.1", 0, tmp / "tenants.keys", tmp / "usage.sqlite", tenants,
                         access_log=None, max_body_bytes=64 * 1024)


@contextlib.contextmanager
def running(tmp: Path, fake: FakeVllm | None = None, cfg: GatewayConfig | None = None,
            admin_key: str | None = ADMIN_KEY) -> Iterator[Running]:
    fake = fake or FakeVllm()
    cfg = cfg or config(tmp)
    issued = {t.name: keys.add_key(cfg.keys_file, t.name)[0] for t in cfg.tenants}
    with ThreadServer(fake.app()) as upstream:
        gateway = Gateway(cfg, upstream=upstream.url, upstream_key=fake.key, admin_key=admin_key)
        server = GatewayServer(gateway, bind("127.0.0.1", 0))
        server.start()
        try:
            yield Running(f"http://127.0.0.1:{server.port}", gateway, cfg, fake, issued)
        finally:
            server.stop()
