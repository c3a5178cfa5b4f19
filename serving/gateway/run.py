"""``pissa serve`` with tenants: vLLM on loopback (free port, random internal key) behind the gateway.

vLLM's internal key is random per start, unless ``PISSA_GATEWAY_INTERNAL_KEY`` is set (to reach vLLM
directly on loopback, e.g. to compare answers with and without the gateway).

One process to stop: the gateway runs in a thread of ``pissa serve`` (:mod:`.server`); vLLM runs as
always (:func:`serving.launcher.run_plan`), and SIGINT/SIGTERM stop both. Adapters loaded at run time
through the gateway (recorded in ``usage_db``) are served again at the next start, so their grants
still mean something; one whose folder is gone is left out with a warning.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from pissa.core.errors import InvalidOptionsError
from pissa.core.manifests import name_problem
from serving.command import LaunchPlan, client_url
from serving.gateway import keys, store
from serving.launcher import ServeResult, plan_serving, run_plan
from serving.manifest import AdapterSpec, ModelRef, ServeManifest
from serving.vllm_env import free_port, require_vllm

logger = logging.getLogger(__name__)

INTERNAL_KEY_ENV = "PISSA_GATEWAY_INTERNAL_KEY"
LOOPBACK = "127.0.0.1"


def upstream_manifest(manifest: ServeManifest, port: int | None = None) -> ServeManifest:
    """The manifest vLLM runs behind the gateway: loopback, ``port`` (default: a free one), the internal
    key, and the adapters loaded at run time before (still on disk)."""
    gw = manifest.gateway
    assert gw is not None
    served = set(manifest.served_names)
    extra = []
    for name, path in store.runtime_adapters(gw.usage_db).items():
        if name in served:
            continue
        if not Path(path).exists():
            logger.warning("adapter %s (loaded at run time) is gone from %s: not serving it", name, path)
            continue
        if name_problem(name):  # recorded by an older version, which did not check: it would break vLLM's start
            logger.warning("adapter %r (loaded at run time) has a name vLLM cannot be started with: not serving it",
                           name)
            continue
        extra.append(AdapterSpec(name, ModelRef(path, True)))
    settings = manifest.vllm.model_copy(update={"host": LOOPBACK, "port": port or free_port(),
                                                "api_key_env": INTERNAL_KEY_ENV})
    return replace(manifest, adapters=manifest.adapters + tuple(extra), vllm=settings)


def serve_with_gateway(
    manifest: ServeManifest,
    *,
    dry_run: bool = False,
    log_path: str | Path | None = None,
    on_ready: Callable[[LaunchPlan, float, Path], None] | None = None,
) -> ServeResult:
    """Validate, start vLLM on loopback, then the gateway on the public address; run until stopped.

    The plan given to ``on_ready`` and returned has the public URL; its notes name the loopback one.

    Raises:
        InvalidOptionsError: ``api_key_env`` (the admin key) names an unset variable.
        CorruptCheckpointError: the keys file or the usage database cannot be read.
        ServingError: the public port is taken, or vLLM failed (see :func:`serving.launcher.serve`).
    """
    from serving.gateway.app import Gateway
    from serving.gateway.server import GatewayServer, bind

    gw = manifest.gateway
    assert gw is not None
    admin_env = manifest.vllm.api_key_env
    admin_key = os.environ.get(admin_env) if admin_env else None
    if admin_env and not admin_key:
        raise InvalidOptionsError("admin key missing", [f"vllm.api_key_env names {admin_env!r}, which is not set"],
                                  fix=f"export {admin_env}=<admin key> before starting, or drop api_key_env")
    # A keys file the gateway cannot read would start it with no keys (it keeps the previous keys when the
    # file breaks while it runs): refuse to start instead, dry run included.
    keys.read_keys(gw.keys_file)
    internal_key = os.environ.get(INTERNAL_KEY_ENV) or secrets.token_urlsafe(32)
    inner = upstream_manifest(manifest)
    plan = plan_serving(inner, environ={**os.environ, INTERNAL_KEY_ENV: internal_key})
    notes = (*plan.notes, f"vLLM listens on loopback only: {plan.url} (internal key)",
             f"tenants: {', '.join(t.name for t in gw.tenants)}; keys {gw.keys_file}; usage {gw.usage_db}"
             + ("" if admin_key else "; no admin key (vllm.api_key_env): admin paths are closed"))
    public = replace(plan, url=client_url(gw.host, gw.port), host=gw.host, port=gw.port, notes=notes)
    if dry_run:
        return ServeResult(public, None, None, None)
    require_vllm("to run `pissa serve` (--dry-run works without it)")
    sock = bind(gw.host, gw.port)
    server = GatewayServer(Gateway(gw, upstream=plan.url, upstream_key=internal_key, admin_key=admin_key), sock)

    def ready(_: LaunchPlan, startup: float, log: Path) -> None:
        server.start()
        logger.info("gateway listening on %s", public.url)
        if on_ready is not None:
            on_ready(public, startup, log)

    try:
        result = run_plan(plan, health_timeout=manifest.vllm.health_timeout, log_path=log_path, on_ready=ready)
    finally:
        server.stop()
    return replace(result, plan=public)
